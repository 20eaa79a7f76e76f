"""Sequence-parallel prefill on one GPU: the cuDNN log-sum-exp pieces against the fp32
reference, and a whole SP group (ranks as threads sharing the GPU, bf16, Triton Triangle
layers) against the fp32 single-process prefill (DESIGN.md section 7: relative RMS 1e-2)."""

from __future__ import annotations

import threading

import pytest
import torch
from disagg_kernels.triangle_mix import masked_attention_reference
from helpers import LogitsCapture

from benchmarks.sp_collectives import ThreadGroup
from disagg.attention.partial import attention_with_lse
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.sequence_parallel import SequenceParallelPrefill
from disagg.prefill.sp_plan import ZigzagPlan
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("num_q, num_k, causal", [(1000, 1000, True), (333, 1709, False),
                                                  (4096, 4096, True)])
def test_cuda_pieces_with_lse_match_the_fp32_reference(num_q, num_k, causal):
    g = torch.Generator(device="cuda").manual_seed(num_q)
    q = torch.randn(num_q, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(num_k, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    out, lse = attention_with_lse(q, k, v, causal=causal, scale=128**-0.5)
    keep = torch.ones(num_q, num_k, dtype=torch.bool, device="cuda")
    if causal:
        keep = keep.tril()
    ref, ref_lse = masked_attention_reference(q.float(), k.float(), v.float(), keep, 128**-0.5)
    assert out.shape == q.shape and lse.shape == (32, num_q) and lse.dtype == torch.float32
    assert rel_rms(out, ref) < 5e-3
    assert float((lse - ref_lse).abs().max()) < 2e-2  # natural log, like the merge expects


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("trianglemix", [published_trianglemix("smollm2-135m"), None],
                         ids=["trianglemix", "dense"])
def test_sp_group_on_one_gpu_matches_fp32_single_process(world, trianglemix):
    n = 3001
    source = ModelSource(name="smollm2-135m", random_config="smollm2-135m", seed=0)
    gpu_model = LogitsCapture(load_model(source, device="cuda", dtype=torch.bfloat16))
    cpu_model = LogitsCapture(
        load_model(source, device="cuda", dtype=torch.bfloat16).float().cpu())
    vocab = gpu_model.config.vocab_size
    prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    request = EngineRequest.create("r", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                                   vocab_size=vocab, context=8192)
    ref = PrefillEngine(cpu_model, model_name="m", trianglemix=trianglemix).prefill(request)
    engine = PrefillEngine(gpu_model, model_name="m", trianglemix=trianglemix)
    group = ThreadGroup(world)
    results, errors = [None] * world, []

    def rank_main(rank):
        try:
            sp = SequenceParallelPrefill(engine, group.member(rank))
            results[rank] = sp.prefill(request)
        except BaseException as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert rel_rms(gpu_model.logits[0].cpu(), cpu_model.logits[0]) < 1e-2
    plan = ZigzagPlan(n, world)
    for layer in range(gpu_model.config.num_layers):
        for name in ("k", "v"):
            full = torch.empty_like(getattr(ref.kv, name)[layer])
            for r in range(world):
                full[plan.positions(r)] = getattr(results[r].kv, name)[layer].float().cpu()
            assert rel_rms(full, getattr(ref.kv, name)[layer]) < 1e-2, (layer, name)
