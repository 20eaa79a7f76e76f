"""The dense-attention kernels on CUDA: FlashAttention-2 and -4 against an fp32 reference and
against cuDNN (same bound as every bf16 kernel), strided views of a packed qkv, and the tuned
choice routing ``dense_attention``. The FA4 tests skip where ``flash-attn-4`` is not
installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disagg.attention import dense_backends as db
from disagg.attention.dense import dense_attention

pytestmark = pytest.mark.gpu
KERNEL_REL_RMS = 5e-3  # STYLE.md: bf16 kernels against an fp32 reference


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _qkv(n, hq, hkv, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for h in (hq, hkv, hkv)]


def _reference(q, k, v):
    out = F.scaled_dot_product_attention(*(x.float().transpose(0, 1) for x in (q, k, v)),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(0, 1)


@pytest.fixture
def clean():
    db.reset_choices()
    yield
    db.reset_choices()


@pytest.fixture
def fa4(clean):
    if not db.fa4_available():
        pytest.skip("flash-attn-4 is not installed")


@pytest.mark.parametrize("n, hq, hkv, d", [(4096, 32, 8, 128), (3000, 9, 3, 64),
                                           (777, 32, 8, 128)])
def test_fa2_matches_fp32_and_cudnn(clean, n, hq, hkv, d):
    q, k, v = _qkv(n, hq, hkv, d)
    out = db.causal_square(q, k, v, None, "flash")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_rms(out, _reference(q, k, v)) < KERNEL_REL_RMS
    assert rel_rms(out, db.causal_square(q, k, v, None, "cudnn")) < KERNEL_REL_RMS
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        db.causal_square(q, k, v, None, "flash")
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    assert "flash" in names and "cudnn" not in names, names  # not a fallback


@pytest.mark.parametrize("n, hq, hkv, d", [(4096, 32, 8, 128), (3000, 9, 3, 64),
                                           (777, 32, 8, 128)])
def test_fa4_matches_fp32_and_cudnn(fa4, n, hq, hkv, d):
    q, k, v = _qkv(n, hq, hkv, d)
    ref = _reference(q, k, v)
    out = db.causal_square(q, k, v, None, "fa4")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_rms(out, ref) < KERNEL_REL_RMS
    assert rel_rms(out, db.causal_square(q, k, v, None, "cudnn")) < KERNEL_REL_RMS


def test_fa4_reads_strided_views_of_a_packed_qkv(fa4):
    n, hq, hkv, d = 2048, 32, 8, 128
    qkv = torch.randn(n, hq + 2 * hkv, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    assert rel_rms(db.causal_square(q, k, v, 0.07, "fa4"),
                   db.causal_square(q.contiguous(), k.contiguous(), v.contiguous(), 0.07,
                                    "cudnn")) < KERNEL_REL_RMS


def test_tuned_choice_routes_dense_attention(clean, monkeypatch):
    monkeypatch.delenv(db.ENV_VAR, raising=False)
    timings = db.tune_causal(torch.device("cuda"), num_heads=32, num_kv_heads=8, head_dim=128,
                             dtype=torch.bfloat16, max_tokens=8192, calls_per_prompt=16)
    assert [t.key.bucket for t in timings] == [256, 512, 1024, 2048, 4096, 8192]
    kernels = {"cudnn", "flash"} | ({"fa4"} if db.fa4_available() else set())
    for t in timings:  # the winner is the cheapest prompt: 16 steady calls + the first's extra
        assert set(t.seconds) == set(t.first_seconds) == kernels and t.calls == 16
        assert t.tokens == t.key.bucket - 1  # measured at a length no call had
        assert t.cost(t.winner) == min(t.cost(name) for name in t.seconds), t.as_row()
        assert all(t.first_seconds[name] > 0 for name in t.seconds)
    q, k, v = _qkv(8000, 32, 8, 128)
    winner = timings[-1].winner
    assert db.kernel_for(q, k) == winner
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dense_attention(q, k, v, q_start=0)
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    assert ("cudnn" in names) == (winner == "cudnn"), names
    assert winner != "flash" or "flash" in names, names
