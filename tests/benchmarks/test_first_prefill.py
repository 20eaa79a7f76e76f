"""benchmarks/first_prefill.py on CPU: each timed prefill lands its KV in the pool stand-in
through the direct writer."""

from __future__ import annotations

import torch

from benchmarks.first_prefill import PoolStandIn, run_one
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams


def test_run_one_writes_the_prompt_kv_into_the_pool():
    source = ModelSource(name="random:smollm2-135m", random_config="smollm2-135m", seed=0)
    model = load_model(source, device="cpu", dtype=torch.float32)
    engine = PrefillEngine(model, model_name=source.name,
                           trianglemix=published_trianglemix("smollm2-135m"))
    pool = PoolStandIn(engine, 64)
    for t in (*pool.k, *pool.v):
        t.fill_(float("nan"))
    ids = list(range(5, 45))
    request = EngineRequest.create("r", ids, SamplingParams(temperature=0.0, max_tokens=1),
                                   vocab_size=model.config.vocab_size, context=128)
    row = run_one(engine, pool, request)
    expected = engine.prefill(request).kv  # the engine's own packed KV of the same prompt
    assert row["prompt_tokens"] == 40 and row["prefill_ms"] > 0
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(pool.k[layer][:40], expected.k[layer])
        torch.testing.assert_close(pool.v[layer][:40], expected.v[layer])
        assert pool.k[layer][40:].isnan().all()  # rows past the prompt untouched

