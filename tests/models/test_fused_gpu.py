"""The fused prefill path on CUDA (bf16): fused ops against their fp32 references, the bf16
model against an fp32 reference (DESIGN.md §7: last-position logits and every layer's K/V
within relative RMS 1e-2), cuDNN for dense prefill attention, and a warm-up after which
no prompt length compiles anything."""

from __future__ import annotations

import pytest
import torch
from disagg_kernels import fused

from disagg.attention.dense import dense_attention
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.warmup import warm_up_prefill
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

pytestmark = pytest.mark.gpu

KERNEL_REL_RMS = 5e-3  # STYLE.md: bf16 kernels against an fp32 reference
MODEL_REL_RMS = 1e-2  # DESIGN.md §7: bf16 model against an fp32 reference


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _randn(*shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("rows, hidden", [(1, 4096), (1000, 4096), (4097, 576)])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_bf16(rows, hidden, residual_dtype):
    from disagg_kernels.fused.launcher import rms_norm_triton

    x, w = _randn(rows, hidden), _randn(hidden, seed=1)
    res = _randn(rows, hidden, seed=2, dtype=residual_dtype)
    ref_res = res.float() + x.float()
    ref = fused.rms_norm_reference(ref_res, w.float(), 1e-5)
    out = torch.full_like(x, float("nan"))
    rms_norm_triton(x, w, 1e-5, residual=res, out=out)
    assert rel_rms(res, ref_res) < KERNEL_REL_RMS
    assert rel_rms(out, ref) < KERNEL_REL_RMS
    plain = rms_norm_triton(x, w, 1e-5, out=torch.full_like(x, float("nan")))
    assert rel_rms(plain, fused.rms_norm_reference(x.float(), w.float(), 1e-5)) < KERNEL_REL_RMS


@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 8, 128), (3001, 32, 128), (777, 9, 64)])
def test_rope_bf16(tokens, heads, head_dim):
    x = _randn(tokens, heads, head_dim)
    angles = torch.arange(tokens, device="cuda").float()[:, None] * torch.rand(
        head_dim // 2, device="cuda")[None, :]
    cos, sin = angles.cos(), angles.sin()
    ref = fused.rope_reference(x.float(), cos, sin)
    assert fused.rope(x, cos, sin) is x
    assert rel_rms(x, ref) < KERNEL_REL_RMS


@pytest.mark.parametrize("shape", [(1, 14336), (1001, 1536)])
def test_silu_mul_bf16(shape):
    g, u = _randn(*shape), _randn(*shape, seed=1)
    ref = fused.silu_mul_reference(g.float(), u.float())
    out = fused.silu_mul(g, u, out=torch.full_like(g, float("nan")))
    assert rel_rms(out, ref) < KERNEL_REL_RMS
    assert rel_rms(fused.silu_mul(g, u, out=g), ref) < KERNEL_REL_RMS


def test_silu_mul_bf16_over_a_packed_gate_up():
    gate, up = _randn(1001, 2 * 14336).chunk(2, dim=-1)
    ref = fused.silu_mul_reference(gate.float(), up.float())
    assert rel_rms(fused.silu_mul(gate, up, out=gate), ref) < KERNEL_REL_RMS


def _prefill(model, name, trianglemix, prompt):
    from benchmarks.bf16_reference_gap import prefill_logits_and_kv

    request = EngineRequest.create("r", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                                   vocab_size=model.config.vocab_size,
                                   context=model.config.max_context_tokens)
    return prefill_logits_and_kv(model, name, trianglemix, request)


@pytest.mark.parametrize("name, trianglemix, n, reference_device", [
    # 30 layers: where a bf16 residual stream drifted past the bound by layer 11.
    ("smollm2-135m", published_trianglemix("smollm2-135m"), 3000, "cpu"),
    ("smollm2-135m", None, 3000, "cpu"),
])
def test_bf16_model_matches_fp32_reference(name, trianglemix, n, reference_device):
    source = ModelSource(name=name, random_config=name, seed=0)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(0, model.config.vocab_size, (n,),
                           generator=torch.Generator().manual_seed(n)).tolist()
    logits, kv = _prefill(model, name, trianglemix, prompt)
    num_layers = model.config.num_layers
    ref_model = model.float().to(reference_device)  # the same bf16-rounded weights, in fp32
    del model
    ref_logits, ref_kv = _prefill(ref_model, name, trianglemix, prompt)
    assert rel_rms(logits, ref_logits) < MODEL_REL_RMS
    for layer in range(num_layers):
        assert rel_rms(kv.k[layer].cpu(), ref_kv.k[layer].cpu()) < MODEL_REL_RMS, layer
        assert rel_rms(kv.v[layer].cpu(), ref_kv.v[layer].cpu()) < MODEL_REL_RMS, layer


def test_bf16_llama_8b_is_no_further_from_fp32_than_transformers():
    """Random Llama-3.1-8B weights amplify bf16 rounding past the 1e-2 of DESIGN.md §7 in any
    bf16 engine (measured on the H200 at 2000 tokens: transformers + SDPA 7.0e-2 at its logits,
    ours 5.5e-2, our K/V past 1e-2 from layer 1 on), so at the benchmark's shapes the bound is
    relative: ours no further from fp32 than transformers' bf16 is from its fp32, and our fp32
    run equal to transformers' fp32 (the fused ops and attention paths in fp32, on the GPU)."""
    from benchmarks.bf16_reference_gap import measure

    rows = {r["mode"]: r for r in measure("llama-3.1-8b", 2000)}
    theirs = rows["dense"]["transformers_logits_rel_rms"]
    assert rows["dense"]["ours_fp32_vs_transformers_fp32"] < 1e-4
    for mode in ("dense", "trianglemix"):
        assert rows[mode]["ours_logits_rel_rms"] <= theirs, mode
        assert rows[mode]["ours_kv_rel_rms_max"] <= theirs, mode


def test_dense_prefill_attention_runs_cudnn(monkeypatch):
    monkeypatch.setenv("DISAGG_DENSE_ATTENTION", "cudnn")  # FA4, when tuned, has its own test
    q, k, v = _randn(4096, 32, 128), _randn(4096, 8, 128, seed=1), _randn(4096, 8, 128, seed=2)
    dense_attention(q, k, v, q_start=0)  # plans built outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dense_attention(q, k, v, q_start=0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(sorted(set(names)))
    assert any("cudnn" in n.lower() for n in names), names
    assert not any("flash_fwd" in n for n in names), names


def _compiled_variants() -> int:
    """Compiled Triton variants of every kernel a prefill launches (in-process caches)."""
    from disagg_kernels.fused import kernel as fused_kernel
    from disagg_kernels.triangle_mix import kernel as triangle_kernel

    fns = [triangle_kernel._triangle_fwd, triangle_kernel._merge_splits,
           fused_kernel._rms_norm_fwd, fused_kernel._rope_fwd, fused_kernel._silu_mul_fwd]
    return sum(len(entry[0]) for fn in fns for entry in fn.device_caches.values())


@pytest.mark.parametrize("name", ["llama-3.1-8b"])
def test_nothing_compiles_after_warm_up(name):
    source = ModelSource(name=name, random_config=name, seed=0)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    engine = PrefillEngine(model, model_name=name, trianglemix=published_trianglemix(name))
    report = warm_up_prefill(engine)
    assert len(report.prompt_lengths) > 1  # the dense prefill and the Triangle classes
    before = _compiled_variants()
    assert before > 0
    vocab = model.config.vocab_size
    lengths = [649, 700, 1000, 1601, 2049, 2222, 3000, 4096, 5001, 8000]
    if name == "llama-3.1-8b":
        lengths += [12345, 32768]
    for n in lengths:
        prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        request = EngineRequest.create("r", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                                       vocab_size=vocab, context=model.config.max_context_tokens)
        engine.prefill(request)
    assert _compiled_variants() == before
