"""Dynamic block-sparse attention on CPU: the Triton kernel under TRITON_INTERPRET=1 against the
PyTorch reference, the reference against an explicit mask, and the block selection.

fp32 and fp16 only in the interpreter (bf16 ``tl.dot`` is wrong there; bf16 runs on the GPU).
Lengths that are not block multiples, GQA ratios 1/2/3, every output NaN-poisoned first.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from disagg_kernels.dynamic_sparse import (
    DynamicSparseParams,
    antidiagonal_block_scores,
    block_mask,
    block_scores,
    block_sparse_attention_reference,
    blocks_from_mask,
    dynamic_sparse_attention,
    kept_fraction,
    select_blocks,
    vertical_slash_block_scores,
)
from disagg_kernels.triangle_mix import dense_causal_reference, masked_attention_reference

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests (no CUDA here)")

FP32_ATOL = 2e-5
FP16_REL_RMS = 5e-3
BS = 32


def _qkv(n, hq, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _random_lists(n, hkv, seed, p=0.5):
    """Random causal block lists (the diagonal kept, so every row has a key)."""
    nb = math.ceil(n / BS)
    keep = torch.rand(hkv, nb, nb, generator=torch.Generator().manual_seed(seed)) < p
    keep[:, torch.arange(nb), torch.arange(nb)] = True
    return blocks_from_mask(keep)


def _triton(q, k, v, idx, cnt, config=None):
    from disagg_kernels.dynamic_sparse.launcher import block_sparse_attention_triton

    out = torch.full_like(q, float("nan"))
    block_sparse_attention_triton(q, k, v, idx, cnt, block_size=BS, out=out, config=config)
    assert not out.isnan().any(), "unwritten output rows"
    return out


def _rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("n,hq,hkv", [(63, 2, 2), (111, 4, 2), (200, 6, 2)])
def test_reference_equals_explicit_mask(n, hq, hkv):
    q, k, v = _qkv(n, hq, hkv, 16, seed=n)
    idx, cnt = _random_lists(n, hkv, seed=n)
    ours = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=BS)
    mask = block_mask(idx, cnt, n, BS)
    group = hq // hkv
    for h in range(hkv):  # the explicit mask differs per KV head: one head group at a time
        heads = slice(h * group, (h + 1) * group)
        ref, _ = masked_attention_reference(q[:, heads], k[:, h:h + 1], v[:, h:h + 1], mask[h])
        assert torch.allclose(ours[:, heads], ref, atol=FP32_ATOL)


@interpreter
@pytest.mark.parametrize("n,hq,hkv", [(63, 2, 2), (111, 4, 2), (200, 6, 2)])
def test_triton_matches_reference_fp32(n, hq, hkv):
    q, k, v = _qkv(n, hq, hkv, 16, seed=n + 1)
    idx, cnt = _random_lists(n, hkv, seed=n + 1)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=BS)
    assert (_triton(q, k, v, idx, cnt) - ref).abs().max() <= FP32_ATOL


@interpreter
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (32, 32)])
def test_triton_tiles_of_any_shape_match_reference(block_m, block_n):
    """Query slices larger or smaller than the key tile, and one slice per block: the diagonal
    block's tiles stop at each slice's last row, rows past the prompt are never written."""
    from disagg_kernels.dynamic_sparse.configs import TileConfig

    q, k, v = _qkv(111, 4, 2, 16, seed=5)
    idx, cnt = _random_lists(111, 2, seed=5, p=0.4)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=BS)
    config = TileConfig(block_n=block_n, num_warps=4, num_stages=1, block_m=block_m)
    assert (_triton(q, k, v, idx, cnt, config) - ref).abs().max() <= FP32_ATOL


@interpreter
def test_a_row_without_its_diagonal_block_matches_reference():
    """Lists that leave the diagonal out (only earlier blocks): the unmasked loop alone."""
    n, hkv = 128, 2
    nb = n // BS
    q, k, v = _qkv(n, 4, hkv, 16, seed=6)
    keep = torch.zeros(hkv, nb, nb, dtype=torch.bool)
    keep[:, 1:, 0] = True  # rows of blocks 1.. see block 0 only; block 0 sees nothing
    idx, cnt = blocks_from_mask(keep)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=BS)
    assert (_triton(q, k, v, idx, cnt) - ref).abs().max() <= FP32_ATOL
    assert torch.equal(ref[:BS], torch.zeros_like(ref[:BS]))  # no key: zeros, as documented


@interpreter
def test_triton_matches_reference_fp16():
    q, k, v = _qkv(150, 4, 2, 32, torch.float16, seed=3)
    idx, cnt = _random_lists(150, 2, seed=3, p=0.3)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt,
                                           block_size=BS)
    assert _rel_rms(_triton(q, k, v, idx, cnt), ref) <= FP16_REL_RMS


@interpreter
def test_every_block_kept_is_dense_attention():
    n, hkv = 97, 2
    q, k, v = _qkv(n, 6, hkv, 16, seed=4)
    nb = math.ceil(n / BS)
    idx, cnt = blocks_from_mask(torch.ones(hkv, nb, nb, dtype=torch.bool))
    dense, _ = dense_causal_reference(q, k, v)
    assert (_triton(q, k, v, idx, cnt) - dense).abs().max() <= FP32_ATOL
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=BS)
    assert (ref - dense).abs().max() <= FP32_ATOL


def test_stride_one_estimate_is_the_exact_block_mass():
    n, hq, hkv, d = 96, 4, 2, 16
    q, k, _ = _qkv(n, hq, hkv, d, seed=5)
    scores = antidiagonal_block_scores(q, k, block_size=BS, stride=1)
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(hq // hkv, 1)) / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -float("inf"))
    p = torch.softmax(s, -1).view(hkv, hq // hkv, n // BS, BS, n // BS, BS).sum(dim=(1, 3, 5))
    exact = p / p.sum(-1, keepdim=True)
    assert torch.allclose(scores, exact, atol=1e-5)


@pytest.mark.parametrize("n,stride", [(96, 1), (150, 8)])
def test_estimate_is_the_same_in_row_chunks(monkeypatch, n, stride):
    """Query super-tokens taken one block at a time (each chunk seeing only the keys up to its
    end, the padded keys hidden) give the estimate of one product over everything."""
    from disagg_kernels.dynamic_sparse import selection

    q, k, _ = _qkv(n, 4, 2, 16, seed=8)
    whole = antidiagonal_block_scores(q, k, block_size=BS, stride=stride)
    monkeypatch.setattr(selection, "_CHUNK_SUPER", 1)  # one block of rows per chunk
    chunked = antidiagonal_block_scores(q, k, block_size=BS, stride=stride)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.allclose(chunked.sum(-1), torch.ones_like(chunked[..., 0]), atol=1e-5)


def test_vertical_slash_scores_follow_their_definition():
    """Against the definition written out loop by loop: the last queries' attention (group
    heads summed); a block scores its columns' mass plus every diagonal's mass weighted by the
    share of the block's rows it crosses; rows normalized."""
    n, hq, hkv, d, last = 100, 4, 2, 16, 8
    q, k, _ = _qkv(n, hq, hkv, d, seed=9)
    ours = vertical_slash_block_scores(q, k, block_size=BS, last_queries=last)
    nb, group = math.ceil(n / BS), hq // hkv
    for h in range(hkv):
        rows = range(n - last, n)
        p = torch.zeros(last, n)
        for g in range(group):
            s = q[n - last:, h * group + g] @ k[:, h].T / math.sqrt(d)
            s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(n - last, n)[:, None],
                              -float("inf"))
            p += torch.softmax(s, -1)
        want = torch.zeros(nb, nb)
        for qb in range(nb):
            for kb in range(qb + 1):
                score = float(p[:, kb * BS:(kb + 1) * BS].sum())
                for li, i in enumerate(rows):
                    for j in range(i + 1):
                        share = 1 - abs((i - j) - (qb - kb) * BS) / BS
                        score += float(p[li, j]) * max(0.0, share)
                want[qb, kb] = score
        assert torch.allclose(ours[h], want / want.sum(-1, keepdim=True), atol=1e-5)


def test_vertical_slash_ranks_a_planted_column_and_diagonal_first():
    """Keys that every query attends to (a column), or keys at a fixed offset from each query (a
    diagonal), make the blocks they fall in the best of each row: the patterns the estimate
    exists to find."""
    n, d = 256, 16
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(n, 1, d, generator=g) * 0.1, torch.randn(n, 1, d, generator=g) * 0.1
    column = k.clone()
    column[40:44, 0] = q[:, 0].sum(0) * 10  # keys 40-43 (block 1) match every query
    scores = vertical_slash_block_scores(q, column, block_size=BS, last_queries=32)
    rows = torch.arange(2, n // BS)
    assert (scores[0, rows].argmax(-1) == 1).all()
    offset = 2 * BS + 8  # query i matches key i - 72: block diagonal 2 (and 3 for early rows)
    diagonal = k.clone()
    diagonal[:n - offset, 0] = q[offset:, 0] * 40
    scores = vertical_slash_block_scores(q, diagonal, block_size=BS, last_queries=32)
    rows = torch.arange(4, n // BS)
    best = scores[0, rows].argmax(-1)
    assert ((best == rows - 2) | (best == rows - 3)).all()


def test_the_method_picks_the_estimate():
    q, k, _ = _qkv(150, 4, 2, 16, seed=11)
    vs = DynamicSparseParams(block_size=BS, method="vertical_slash", last_queries=16)
    assert torch.equal(block_scores(q, k, vs),
                       vertical_slash_block_scores(q, k, block_size=BS, last_queries=16))
    ad = DynamicSparseParams(block_size=BS, stride=8, method="antidiagonal")
    assert torch.equal(block_scores(q, k, ad),
                       antidiagonal_block_scores(q, k, block_size=BS, stride=8))
    assert "vertical_slash=16" in vs.tag and "stride=8" in ad.tag
    with pytest.raises(ValueError, match="method"):
        DynamicSparseParams(method="diagonal")


def test_estimate_rows_sum_to_one_and_are_causal():
    q, k, _ = _qkv(150, 4, 2, 16, seed=6)
    scores = antidiagonal_block_scores(q, k, block_size=BS, stride=8)
    assert torch.allclose(scores.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert (scores.triu(1) == 0).all()


def test_selection_keeps_diagonal_and_sink_and_meets_the_threshold():
    q, k, _ = _qkv(300, 4, 2, 16, seed=7)
    scores = antidiagonal_block_scores(q, k, block_size=BS, stride=8)
    params = DynamicSparseParams(block_size=BS, stride=8, threshold=0.6)
    idx, cnt = select_blocks(scores, params)
    nb = scores.shape[1]
    keep = torch.zeros(2, nb, nb, dtype=torch.bool)
    for h in range(2):
        for qb in range(nb):
            listed = idx[h, qb, : cnt[h, qb]].long()
            assert listed.tolist() == sorted(set(listed.tolist()))
            assert qb in listed.tolist() and 0 in listed.tolist()
            assert (listed <= qb).all()
            keep[h, qb, listed] = True
    assert ((scores * keep).sum(-1) >= 0.6 - 1e-6).all()
    assert kept_fraction(cnt) < 1.0


def test_density_mode_keeps_its_quota():
    q, k, _ = _qkv(320, 2, 1, 16, seed=8)
    scores = antidiagonal_block_scores(q, k, block_size=BS, stride=8)
    _, cnt = select_blocks(scores, DynamicSparseParams(block_size=BS, stride=8, density=0.35))
    quota = torch.ceil(0.35 * torch.arange(1, 11).float()).int()
    assert (cnt[0] >= quota).all() and (cnt[0] <= quota + 2).all()  # + diagonal and sink


def test_full_density_is_dense_attention():
    q, k, v = _qkv(130, 4, 2, 16, seed=9)
    params = DynamicSparseParams(block_size=BS, stride=8, density=1.0)
    out, cnt = dynamic_sparse_attention(q, k, v, params=params)
    assert kept_fraction(cnt) == 1.0
    assert (out - dense_causal_reference(q, k, v)[0]).abs().max() <= FP32_ATOL


def test_params_are_validated():
    with pytest.raises(ValueError):
        DynamicSparseParams(block_size=48)
    with pytest.raises(ValueError):
        DynamicSparseParams(stride=3)
    with pytest.raises(ValueError):
        DynamicSparseParams(density=0.0)
