"""Prefill warm-up: a tiny CPU warm-up, and Triangle warm-up lengths that cover every Triton
specialization class a served prompt can reach."""

from __future__ import annotations

import pytest
import torch
from disagg_kernels.dynamic_sparse import DynamicSparseParams
from disagg_kernels.triangle_mix import TriangleParams
from helpers import random_model

from disagg.attention.triangle import TriangleMixConfig
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.warmup import (
    DENSE_WARMUP_TOKENS,
    num_dense_layers,
    triangle_specialization,
    triangle_warmup_lengths,
    warm_up_prefill,
)


def test_cpu_warm_up_is_one_tiny_prefill():
    model, _ = random_model("tiny-llama")
    engine = PrefillEngine(model, model_name="tiny-llama",
                           trianglemix=TriangleMixConfig((1, 2), TriangleParams(4, 32, 16)))
    report = warm_up_prefill(engine)
    assert report.prompt_lengths == (DENSE_WARMUP_TOKENS,)


def test_dense_layer_count_is_what_a_prompt_of_that_length_runs_dense():
    model, _ = random_model("tiny-llama")
    num_layers = model.config.num_layers
    params = TriangleParams(4, 32, 16)  # prompts of at most 52 tokens are all dense
    tri = PrefillEngine(model, model_name="tiny-llama",
                        trianglemix=TriangleMixConfig((1, 2), params))
    assert num_dense_layers(tri, 1000) == num_layers - 2
    assert num_dense_layers(tri, 52) == num_layers
    assert num_dense_layers(PrefillEngine(model, model_name="tiny-llama"), 1000) == num_layers
    dynamic = PrefillEngine(model, model_name="tiny-llama", trianglemix=TriangleMixConfig(
        (1, 2), params, dynamic=DynamicSparseParams(min_tokens=4096)))
    assert num_dense_layers(dynamic, 4095) == num_layers - 2  # under min_tokens: dense
    assert num_dense_layers(dynamic, 4096) == 0  # the other layers run dynamic sparse


@pytest.mark.parametrize("name, params", [
    ("llama-3.1-8b", TriangleParams()),  # GQA 32/8: block_m 128 holds 32 tokens
    ("smollm2-135m", TriangleParams()),  # 9/3: 42 tokens per tile
    ("tiny-llama", TriangleParams(4, 32, 16)),  # head dim 16: the fallback tiles
])
def test_warm_up_lengths_cover_every_specialization_class(name, params):
    pytest.importorskip("triton")
    from disagg_kernels.triangle_mix.configs import pick_config

    from disagg.models.loader import ModelSource

    config = ModelSource(name=name, random_config=name).model_config()

    class _CudaEngine:  # the engine's fields the length search reads, on a pretend H200
        device = torch.device("cuda")
        layout = type("Layout", (), {"dtype": torch.bfloat16})()
        trianglemix = TriangleMixConfig((0,), params)
        model = type("Model", (), {"config": config})()

    group = config.num_heads // config.num_kv_heads
    tiles = pick_config(torch.device("cuda"), config.head_dim, group, torch.bfloat16)
    max_tokens = config.max_context_tokens - 1  # 128K for Llama-3.1-8B
    lengths = triangle_warmup_lengths(_CudaEngine(), max_tokens=max_tokens)
    covered = {triangle_specialization(n, group, tiles, params) for n in lengths}
    first = _CudaEngine.trianglemix.min_sparse_tokens + 1
    g = torch.Generator().manual_seed(0)
    for n in [first, *torch.randint(first, max_tokens, (4000,), generator=g).tolist(),
              max_tokens]:
        assert triangle_specialization(n, group, tiles, params) in covered, n
    assert len(lengths) == len(covered)  # one prefill per class, no more
