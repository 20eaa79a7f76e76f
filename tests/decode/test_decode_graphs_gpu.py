"""The decode step on CUDA: graph replays equal the eager forward, match an fp32 reference, and
the device sampler picks ``sample()``'s tokens from CUDA logits.

Random weights make generated tokens near-ties, so logits are compared, never tokens
(DESIGN.md section 7); the engine itself picks the tokens that the reference then follows.
"""

from __future__ import annotations

import random

import pytest
import torch

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.runner import ModelRunner
from disagg.decode.sampler import RowRequest, Sampler
from disagg.models.loader import ModelSource, load_model
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams, sample

pytestmark = pytest.mark.gpu

BF16_LOGITS_REL_RMS = 1e-2  # DESIGN.md section 7: GPU bf16 against fp32


def _rel_rms(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@torch.inference_mode()
def _reference_last_logits(model, ids: list[int]) -> torch.Tensor:
    c = model.config
    cache = ContiguousKVCache.allocate(num_layers=c.num_layers, max_tokens=len(ids),
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       dtype=torch.float32, device="cuda")
    hidden = model(torch.tensor(ids, device="cuda"), torch.arange(len(ids), device="cuda"),
                   ContiguousAttention(cache, 0, model.scale))
    return model.compute_logits(hidden[-1:])[0]


@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-llama"])
def test_graph_logits_equal_eager_and_match_fp32(name):
    source = ModelSource(name=name, random_config=name, seed=0)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    reference = load_model(source, device="cuda", dtype=torch.bfloat16).float()
    vocab = model.config.vocab_size
    config = DecodeConfig(num_blocks=512, max_num_seqs=8, max_num_batched_tokens=1024)
    engine = DecodeEngine(model, config, model_name=name)
    engine.warm_up()
    assert engine.runner.graphs.captured_sizes == (1, 2, 4, 8)
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(vocab) for _ in range(n)]
               for i, n in enumerate([5, 1500, 333])}  # 1500 > the token budget: chunked
    for rid, ids in prompts.items():
        engine.add_request(EngineRequest.create(
            rid, ids, SamplingParams(temperature=0.0, max_tokens=64), vocab_size=vocab,
            context=model.config.max_context_tokens))
    generated = {rid: [] for rid in prompts}
    eager_runner = ModelRunner(model, engine.cache, max_num_seqs=8)  # same cache, no graphs
    checked = 0
    for _ in range(12):
        batch = engine.scheduler.schedule()
        pure_decode = len(batch.sequences) == 3 and all(
            len(s.token_ids) == 1 for s in batch.sequences)
        if pure_decode:  # 3 rows: the graph of 4 runs with one padded row
            order, graph_logits = engine.runner.forward_logits(batch)
            graph_logits = graph_logits[:3].clone()
            _, eager_logits = eager_runner.forward_logits(batch)
            diff = (graph_logits - eager_logits[:3]).abs().max().item()
            assert torch.equal(graph_logits, eager_logits[:3]), f"max |graph - eager| {diff}"
            for row, seq in enumerate(order):
                ids = prompts[seq.request_id] + generated[seq.request_id]
                ref = _reference_last_logits(reference, ids)
                assert _rel_rms(graph_logits[row], ref) <= BF16_LOGITS_REL_RMS
            checked += 1
        for out in engine.scheduler.update(batch, engine.runner.execute(batch)):
            if out.token is not None:
                generated[out.request_id].append(out.token.token_id)
    assert checked >= 5


def test_device_sampler_equals_sample_on_cuda_logits():
    g = torch.Generator(device="cuda").manual_seed(0)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=50, logprobs=2),
              SamplingParams(temperature=1.2, top_p=0.95, top_k=1000, logprobs=0)]
    sampler = Sampler(64, torch.device("cuda"))
    for scale in (1.0, 4.0):
        logits = torch.randn(64, 128256, device="cuda", generator=g) * scale
        rows = [RowRequest(rng.choice(params), rng.getrandbits(63), rng.randrange(500))
                for _ in range(64)]
        got = sampler.sample(logits, rows)
        want = [sample(logits[b], r.params, r.seed, r.step) for b, r in enumerate(rows)]
        assert [t.token_id for t in got] == [t.token_id for t in want]
        for a, b in zip(got, want):
            if b.logprob is not None:
                assert abs(a.logprob - b.logprob) <= 1e-5
                assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]


def test_overlapped_steps_equal_one_step_at_a_time_on_cuda_graphs():
    """``async_scheduling`` on CUDA (graph replays fed placeholder tokens on the device, the
    host reading each step's tokens one step late) gives bit-identical tokens and logprobs:
    with every request ending by length, both engines run the same batches."""
    name = "tiny-llama"
    source = ModelSource(name=name, random_config=name, seed=0)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 700, 41, 129, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=25, ignore_eos=True, seed=4),
              SamplingParams(temperature=1.1, top_k=20, max_tokens=33, ignore_eos=True, seed=7),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)]
    results, engines = [], []
    for overlapped in (False, True):
        engine = DecodeEngine(model, DecodeConfig(num_blocks=512, max_num_seqs=8,
                                                  max_num_batched_tokens=1024,
                                                  async_scheduling=overlapped),
                              model_name=name)
        engine.warm_up()
        for i, (ids, p) in enumerate(zip(prompts, params)):
            engine.add_request(EngineRequest.create(
                f"r{i}", ids, p, vocab_size=vocab, context=model.config.max_context_tokens))
        got: dict[str, list] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.token is not None:
                    got.setdefault(out.request_id, []).append(
                        (out.token.token_id, out.token.logprob, out.token.top_logprobs))
        assert engine.num_free_blocks == engine.num_total_blocks
        results.append(got)
        engines.append(engine)
    assert results[1] == results[0]
    assert {k: len(v) for k, v in results[1].items()} == {
        "r0": 40, "r1": 25, "r2": 33, "r3": 1, "r4": 17}
    assert engines[1].num_overlapped_steps > 20 and engines[0].num_overlapped_steps == 0


def test_two_stage_argmax_equals_torch_argmax_on_cuda():
    from disagg.decode.sampler import argmax_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (128256, 49152):
        for rows in (1, 8, 64):
            x = torch.randn(rows, vocab, device="cuda", generator=g)
            x[0, 5] = x[0, vocab - 3] = x[0].max() + 1
            if rows > 2:
                x[1] = float("-inf")
                x[2, 7] = x[2, vocab - 1] = float("nan")
            assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1)), (vocab, rows)
