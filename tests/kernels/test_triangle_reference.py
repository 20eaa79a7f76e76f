"""The PyTorch Triangle reference (the engine's CPU path) and the log-sum-exp merge.

Pure PyTorch, fast: the reference is checked against an explicit-mask dense computation, its
chunking against itself, and its memory shape (never an N x N score block).
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from disagg_kernels.triangle_mix import (
    TriangleParams,
    dense_causal_reference,
    masked_attention_reference,
    merge_attention,
    num_kept_pairs,
    triangle_attention,
    triangle_attention_reference,
    triangle_mask,
)
from disagg_kernels.triangle_mix import reference as reference_module

SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)
FP32_ATOL = 1e-5


def _qkv(n, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _close(a, b, atol=FP32_ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_params_validate():
    with pytest.raises(ValueError):
        TriangleParams(n_sink=-1)
    with pytest.raises(ValueError):
        TriangleParams(n_window=0)
    with pytest.raises(ValueError):
        TriangleParams(n_last=-1)
    assert TriangleParams().num_last(1) == 0
    assert TriangleParams().num_last(100) == 99
    assert TriangleParams().num_last(1000) == 128


@pytest.mark.parametrize("n", [1, 7, 45, 130, 300, 2000])
@pytest.mark.parametrize("params", [SMALL, TriangleParams()])
def test_num_kept_pairs_counts_the_mask(n, params):
    assert num_kept_pairs(n, params) == int(triangle_mask(n, 0, n, 0, n, params).sum())


def test_mask_shape_of_the_pattern():
    n, p = 100, SMALL
    keep = triangle_mask(n, 0, n, 0, n, p)
    assert keep[50, :4].all() and not keep[50, 4:50 - 31].any() and keep[50, 50 - 31:51].all()
    assert keep[n - 16:].equal(torch.ones(16, n, dtype=torch.bool).tril(n - 16))
    assert not keep[n - 17, 4:n - 17 - 31].any()


@pytest.mark.parametrize("n", [1, 7, 45, 130, 300])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 2)])
def test_reference_matches_explicit_mask(n, heads):
    q, k, v = _qkv(n, *heads, 16, seed=n)
    out, lse = triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL)
    ref_out, ref_lse = masked_attention_reference(q, k, v, triangle_mask(n, 0, n, 0, n, SMALL))
    _close(out, ref_out)
    _close(lse, ref_lse)


def test_reference_chunking_defaults(monkeypatch):
    """Default params past the dense threshold, with tiny chunks so every merge path runs."""
    n = 700
    q, k, v = _qkv(n, 4, 2, 32, seed=1)
    ref = masked_attention_reference(q, k, v, triangle_mask(n, 0, n, 0, n, TriangleParams()))
    monkeypatch.setattr(reference_module, "QUERY_CHUNK", 50)
    monkeypatch.setattr(reference_module, "KEY_CHUNK", 64)
    out, lse = triangle_attention_reference(q, k, v, num_tokens=n)
    _close(out, ref[0])
    _close(lse, ref[1])


def test_reference_never_builds_n_by_n(monkeypatch):
    seen = []
    attend = reference_module._attend

    def spy(q, k, v, keep, scale):
        seen.append(keep.shape)
        return attend(q, k, v, keep, scale)

    monkeypatch.setattr(reference_module, "_attend", spy)
    n, p = 6000, TriangleParams()
    q, k, v = _qkv(n, 2, 1, 16)
    triangle_attention_reference(q, k, v, num_tokens=n, params=p)
    rows = max(s[0] for s in seen)
    cols = max(s[1] for s in seen)
    assert rows <= reference_module.QUERY_CHUNK
    assert cols <= max(reference_module.KEY_CHUNK, p.n_window + reference_module.QUERY_CHUNK)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_reference_every_key_kept_is_dense_causal(heads):
    n = 130
    q, k, v = _qkv(n, *heads, 16, seed=3)
    out, lse = triangle_attention_reference(
        q, k, v, num_tokens=n, params=TriangleParams(n_sink=0, n_window=n, n_last=0))
    ref_out, ref_lse = dense_causal_reference(q, k, v)
    _close(out, ref_out)
    _close(lse, ref_lse)


def test_reference_shards_merge_to_whole():
    n = 300
    q, k, v = _qkv(n, 4, 2, 16, seed=4)
    whole_out, whole_lse = triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL)
    q_cuts, k_cuts = [0, 37, 190, 300], [0, 100, 211, 300]
    for qa, qb in pairwise(q_cuts):
        parts = [
            triangle_attention_reference(q[qa:qb], k[ka:kb], v[ka:kb], num_tokens=n,
                                         q_start=qa, k_start=ka, params=SMALL)
            for ka, kb in pairwise(k_cuts)
        ]
        out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        _close(out, whole_out[qa:qb])
        _close(lse, whole_lse[:, qa:qb])


def test_reference_rows_with_no_key_in_range():
    n = 300
    q, k, v = _qkv(n, 2, 1, 16)
    out, lse = triangle_attention_reference(q[:50], k[200:], v[200:], num_tokens=n,
                                            k_start=200, params=SMALL)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_merge_handles_empty_parts():
    g = torch.Generator().manual_seed(5)
    o1, o2 = torch.randn(2, 6, 3, 8, generator=g)
    l1, l2 = torch.randn(2, 3, 6, generator=g)
    l2[:, :2] = -float("inf")
    l1[0, 0] = -float("inf")  # row 0 of head 0: no part saw a key
    out, lse = merge_attention([o1, o2], [l1, l2])
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all()
    _close(out[1, 0], o1[1, 0])
    _close(lse[:, 1], l1[:, 1])
    w1 = torch.exp(l1[:, 3] - lse[:, 3])
    _close(out[3], w1[:, None] * o1[3] + (1 - w1)[:, None] * o2[3])
    assert not torch.isnan(out).any()


def test_dispatch_on_cpu_is_the_reference():
    n = 45
    q, k, v = _qkv(n, 4, 2, 16)
    a = triangle_attention(q, k, v, num_tokens=n, params=SMALL)
    b = triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL)
    assert a[0].equal(b[0]) and a[1].equal(b[1])


def test_inputs_are_checked():
    q, k, v = _qkv(10, 3, 2, 16)
    with pytest.raises(ValueError):
        triangle_attention_reference(q, k, v, num_tokens=10)
    q, k, v = _qkv(10, 4, 2, 16)
    with pytest.raises(ValueError):
        triangle_attention_reference(q, k, v, num_tokens=9)
