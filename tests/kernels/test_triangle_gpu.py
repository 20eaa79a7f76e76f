"""The Triangle Triton kernel on a CUDA GPU: bf16 (and one fp16) against the fp32 reference.

The reference runs on the same bf16-rounded inputs, chunked (never N x N). Every launch writes
into NaN-poisoned destinations. Tolerance: relative RMS of the output <= 5e-3.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from disagg_kernels.triangle_mix import (
    TriangleParams,
    dense_causal_reference,
    merge_attention,
    triangle_attention,
    triangle_attention_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REL_RMS = 5e-3
LSE_ATOL = 2e-3  # scores are fp32 sums of exact bf16 products: only the order differs
SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)


def _launch(q, k, v, **kw):
    from disagg_kernels.triangle_mix.launcher import triangle_attention_triton

    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)
    triangle_attention_triton(q, k, v, out=out, lse=lse, **kw)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten output rows"
    assert not lse.isnan().any(), "unwritten lse entries"
    return out, lse


def _qkv(n, hq, hkv, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g, device="cuda", dtype=dtype)
                 for h in (hq, hkv, hkv))


def _rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _check(out, lse, ref_out, ref_lse):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    err = _rel_rms(out, ref_out)
    assert err <= REL_RMS, f"relative RMS {err:.2e}"
    finite = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)


# (N, Hq, Hkv, D): every N, every head layout and both head dims appear; tile-edge lengths.
CASES = [
    (1, 32, 8, 128), (7, 9, 3, 64), (7, 32, 8, 128),
    (520, 28, 4, 128), (520, 8, 8, 64), (648, 32, 8, 128), (648, 9, 3, 64),
    (1000, 8, 8, 128), (1000, 28, 4, 64), (4109, 32, 8, 128), (4109, 9, 3, 64),
    (4109, 28, 4, 128), (32768, 32, 8, 128), (32768, 8, 8, 64),
]


@pytest.mark.parametrize("n,hq,hkv,d", CASES)
def test_bf16_matches_reference(n, hq, hkv, d):
    q, k, v = _qkv(n, hq, hkv, d, seed=n + hq + d)
    out, lse = _launch(q, k, v, num_tokens=n)
    _check(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n))


@pytest.mark.parametrize("n", [300, 4109])
def test_small_mask_and_fp16(n):
    q, k, v = _qkv(n, 32, 8, 128, seed=3, dtype=torch.float16)
    out, lse = _launch(q, k, v, num_tokens=n, params=SMALL)
    _check(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL))


@pytest.mark.parametrize("loop", [0, 1, 2])
def test_loop_variants(loop):
    """Every tile-walk variant the config table may pick, on the GPU."""
    from dataclasses import replace

    from disagg_kernels.triangle_mix.configs import pick_config

    n = 4109
    q, k, v = _qkv(n, 32, 8, 128, seed=13)
    cfg = replace(pick_config(q.device, 128, 4, q.dtype), loop=loop)
    out, lse = _launch(q, k, v, num_tokens=n, config=cfg)
    _check(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n))


@pytest.mark.parametrize("separate", [False, True], ids=["one-launch", "split-launch"])
def test_last_rows_in_one_or_two_launches(separate):
    """The last rows' split programs in the band's launch, or in one of their own."""
    from dataclasses import replace

    from disagg_kernels.triangle_mix.configs import pick_config

    n = 4109
    q, k, v = _qkv(n, 32, 8, 128, seed=17)
    cfg = pick_config(q.device, 128, 4, q.dtype)
    own = cfg.split or replace(cfg, block_n=64, maxnreg=None)
    cfg = replace(cfg, split=replace(own, min_split_keys=1024) if separate else None,
                  min_split_keys=1024)  # several key splits at this length either way
    out, lse = _launch(q, k, v, num_tokens=n, config=cfg)
    _check(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n))


def test_public_dispatch_runs_the_kernel():
    q, k, v = _qkv(1000, 32, 8, 128, seed=5)
    out, lse = triangle_attention(q, k, v, num_tokens=1000)
    ref = _launch(q, k, v, num_tokens=1000)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])


@pytest.mark.parametrize("heads", [(32, 8), (9, 3)])
def test_every_key_kept_is_dense_causal(heads):
    n = 2000
    d = 128 if heads[0] == 32 else 64
    q, k, v = _qkv(n, *heads, d, seed=7)
    out, lse = _launch(q, k, v, num_tokens=n, params=TriangleParams(0, 1 << 20, 0))
    _check(out, lse, *dense_causal_reference(q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
        enable_gqa=True).transpose(0, 1)
    assert _rel_rms(out, sdpa) <= REL_RMS


def test_shards_merge_to_whole():
    n = 8192
    q, k, v = _qkv(n, 32, 8, 128, seed=9)
    ref_out, ref_lse = triangle_attention_reference(q, k, v, num_tokens=n)
    q_cuts, k_cuts = [0, 3000, 8000, n], [0, 100, 5000, n]
    for qa, qb in pairwise(q_cuts):
        parts = [
            _launch(q[qa:qb], k[ka:kb], v[ka:kb], num_tokens=n, q_start=qa, k_start=ka)
            for ka, kb in pairwise(k_cuts)
        ]
        out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        _check(out, lse, ref_out[qa:qb], ref_lse[:, qa:qb])


def test_index_overflow_past_2_pow_31():
    """N * Hq * D > 2^31: rows past the int32 boundary must still be right."""
    n, hq, hkv, d = (1 << 19) + 4096, 32, 8, 128
    assert n * hq * d > 2**31
    q, k, v = _qkv(n, hq, hkv, d, seed=11)
    out, lse = _launch(q, k, v, num_tokens=n)
    boundary = (2**31) // (hq * d)
    for a, b in [(0, 256), (boundary - 100, boundary + 100), (n - 400, n)]:
        ref_out, ref_lse = triangle_attention_reference(q[a:b], k, v, num_tokens=n, q_start=a)
        _check(out[a:b], lse[:, a:b], ref_out, ref_lse)
