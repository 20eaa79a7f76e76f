"""The first-prefill profiler: it profiles only the first long served prefills it is handed,
writes each one's event times, and the diff ranks events by how much more the first spent."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import torch
from helpers import random_model

from disagg.disaggregated import FirstToken
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.profiling import (
    PROFILE_PREFILLS_ENV,
    FirstPrefillProfiler,
    GCPauses,
    profile_diff,
    replica_diffs,
)
from disagg.prefill.worker import run_prefill
from disagg.request import EngineRequest
from disagg.transport.direct import DirectKVReceiver, DirectKVSender


def _request(model, request_id: str, n: int) -> EngineRequest:
    return EngineRequest.random_prefill(request_id, n, vocab_size=model.config.vocab_size,
                                        context=model.config.max_context_tokens, seed=n)


async def _drain(stream) -> list:
    return [event async for event in stream]


def _offer(model, request: EngineRequest):
    """A decode pool of this process with every block free, and its offer for ``request``."""
    cache = PagedKVCache(KVLayout.of_model(model), 32, 4)
    receiver = DirectKVReceiver()
    receiver.attach(cache)
    table = BlockPool(32, 4).allocate(-(-(request.num_prompt_tokens + 1) // 4))
    runs = tuple(table.slot_runs(4, 0, request.num_prompt_tokens))
    return receiver.destination(request.request_id, runs, request.num_prompt_tokens, ttl_s=60)


def test_served_prefills_profile_the_first_long_ones_only(tmp_path):
    model, _ = random_model("tiny-llama")
    engine = PrefillEngine(model, model_name="tiny-llama", senders=(DirectKVSender(),))
    profiler = FirstPrefillProfiler(tmp_path, torch.device("cpu"), count=2, min_tokens=32)
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        for i, n in enumerate([8, 40, 33, 64]):  # 8 is short; 64 comes after two profiled
            request = _request(model, f"r{i}", n)
            events = asyncio.run(_drain(run_prefill(
                engine, request, (_offer(model, request),), executor=executor,
                eos_token_ids=(), around=profiler.around)))
            assert isinstance(events[0], FirstToken)  # token 0 came back through the worker
    finally:
        executor.shutdown()
    written = sorted(tmp_path.glob("prefill_*.json"))
    assert [p.name.rsplit("_", 1)[1] for p in written] == ["0.json", "1.json"]
    records = [json.loads(p.read_text()) for p in written]
    assert [r["prompt_tokens"] for r in records] == [40, 33]
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    for record in records:  # the prefill's own ops were seen on the worker thread
        assert isinstance(record["gc_pauses"], list)
        assert any("linear" in key or "mm" in key for key in record["events"])
        assert record["profiled_ms"] > 0
    (replica,) = replica_diffs(tmp_path, top=3)  # what served_decode --profile-prefills prints
    assert replica["prompt_tokens"] == [40, 33]
    assert replica["gc_pauses"] == [records[0]["gc_pauses"], records[1]["gc_pauses"]]
    assert replica["diff"] == profile_diff(records[0]["events"], records[1]["events"], 3)


def test_a_profile_that_cannot_be_written_leaves_the_prefill_as_it_was(tmp_path, caplog):
    model, _ = random_model("tiny-llama")
    engine = PrefillEngine(model, model_name="tiny-llama")
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the directory's place is taken: mkdir fails
    profiler = FirstPrefillProfiler(blocked, torch.device("cpu"), count=1)
    request = _request(model, "r", 40)
    with profiler.around(request):
        result = engine.prefill(request)
    assert result.first_token == engine.prefill(request).first_token
    assert "not written" in caplog.text and len(profiler.written) == 1


def test_gc_pauses_records_each_collection_inside_only():
    import gc

    with GCPauses() as pauses:
        gc.collect(1)
        gc.collect(2)
    gc.collect(0)  # outside: not recorded
    assert [p[0] for p in pauses.pauses] == [1, 2]
    assert all(ms >= 0 for _, ms in pauses.pauses)
    assert pauses._callback not in gc.callbacks


def test_profiler_is_off_unless_its_variable_names_a_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(PROFILE_PREFILLS_ENV, raising=False)
    assert FirstPrefillProfiler.from_env(torch.device("cpu")) is None
    monkeypatch.setenv(PROFILE_PREFILLS_ENV, str(tmp_path))
    assert FirstPrefillProfiler.from_env(torch.device("cpu")).out_dir == tmp_path


def test_profile_diff_ranks_by_the_first_requests_extra():
    first = {"a": (100.0, 0.0, 1), "b": (10.0, 500.0, 2), "c": (7.0, 0.0, 1)}
    second = {"a": (20.0, 0.0, 1), "b": (12.0, 100.0, 2), "d": (3.0, 0.0, 1)}
    rows = profile_diff(first, second, top=2)
    assert [r["event"] for r in rows] == ["a", "c", "b"]  # top 2 by CPU, then by device
    assert rows[0]["cpu_us"] == 80.0 and rows[2]["device_us"] == 400.0
    assert rows[2]["calls"] == [2, 2]
