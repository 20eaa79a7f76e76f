"""A prefill replica whose warm-up runs out of device memory fails its start with an error that
names the setting to change, not torch's bare message. No Ray cluster is started."""

from __future__ import annotations

import pytest
import torch

from deployments import prefill_server
from deployments.config import AppConfig
from deployments.prefill_server import PrefillServer
from disagg.errors import ReplicaMemoryError


def test_warm_up_out_of_memory_names_the_decode_pool_setting(monkeypatch):
    def out_of_memory(engine):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB.\nmore")

    monkeypatch.setattr(prefill_server, "warm_up_prefill", out_of_memory)
    config = AppConfig.model_validate({"model": "random:tiny-llama",
                                       "decode": {"kv_cache_gib": 3.5}})
    with pytest.raises(ReplicaMemoryError) as info:
        PrefillServer.func_or_class(config)
    message = str(info.value)
    assert "decode.kv_cache_gib (now 3.5)" in message
    assert "Tried to allocate 64.00 MiB." in message and "more" not in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
