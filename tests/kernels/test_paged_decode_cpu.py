"""The paged decode kernels under TRITON_INTERPRET=1 (same source as on the GPU).

fp32 and fp16 only: bf16 ``tl.dot`` is wrong in the interpreter (bf16 is tested on the GPU).
Tiny blocks (4 rows) scattered over the pool, ragged lengths (0, 1, tile edges), forced split
counts, every output NaN-poisoned first so an unwritten row fails.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from disagg_kernels.paged_decode import paged_decode_reference, slots_of, store_kv_reference
from disagg_kernels.paged_decode.configs import DecodeTileConfig, pick_num_splits
from disagg_kernels.paged_decode.launcher import (
    paged_decode_attention_triton,
    store_kv_triton,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests (no CUDA here)"
)

BLOCK = 4
FP32_ATOL = 2e-5
FP16_REL_RMS = 5e-3


def _paged(lengths, hq, hkv, d, dtype, seed, num_blocks=64):
    """Random q and caches; each sequence's blocks drawn at random from the pool (not
    contiguous, not in order)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks * BLOCK, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * BLOCK, hkv, d, generator=g).to(dtype)
    q = torch.randn(len(lengths), hq, d, generator=g).to(dtype)
    width = max(-(-n // BLOCK) for n in lengths) + 1  # one spare column: padding is ignored
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        nb = -(-n // BLOCK)
        tables[b, :nb] = perm[used:used + nb].int()
        used += nb
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32)


def _run(q, k_cache, v_cache, tables, lens, **kw):
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, block_size=BLOCK, out=out,
                                  **kw)
    assert not out.isnan().any(), "unwritten output rows"
    return out


def _rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 32), (6, 2, 16), (3, 3, 16)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_fp32_matches_reference_on_ragged_scattered_batch(hq, hkv, d, num_splits):
    lengths = [1, 16, 47, 0, 33]  # one key, a tile edge, ragged, an empty (padded) row
    q, kc, vc, tables, lens = _paged(lengths, hq, hkv, d, torch.float32, seed=hq + d)
    out = _run(q, kc, vc, tables, lens, num_splits=num_splits, scale=0.3)
    ref = paged_decode_reference(q, kc, vc, tables, lens, block_size=BLOCK, scale=0.3)
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # no key: zeros, not nan


@pytest.mark.parametrize("min_split_tiles", [2, 3])
def test_splits_of_a_minimum_size_leave_the_last_ones_empty(min_split_tiles):
    # 16-key tiles, 8 splits, at least 2-3 tiles a split: a 47-key row fills 1-2 splits, a
    # 200-key row 5-7; the empty splits must fold in as weight 0.
    lengths = [47, 200, 1, 0, 129]
    q, kc, vc, tables, lens = _paged(lengths, 8, 2, 32, torch.float32, seed=5, num_blocks=128)
    config = DecodeTileConfig(16, 4, 1, min_split_tiles=min_split_tiles)
    out = _run(q, kc, vc, tables, lens, num_splits=8, config=config, scale=0.3)
    ref = paged_decode_reference(q, kc, vc, tables, lens, block_size=BLOCK, scale=0.3)
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)


def test_fp16_within_relative_rms_of_fp32_reference():
    q, kc, vc, tables, lens = _paged([70, 9, 24], 8, 2, 32, torch.float16, seed=3)
    out = _run(q, kc, vc, tables, lens, num_splits=4)
    ref = paged_decode_reference(q.float(), kc.float(), vc.float(), tables, lens,
                                 block_size=BLOCK)
    assert _rel_rms(out, ref) <= FP16_REL_RMS


def test_reference_equals_dense_attention_of_gathered_keys():
    q, kc, vc, tables, lens = _paged([13], 4, 2, 16, torch.float32, seed=5)
    slots = slots_of(tables[0], 13, BLOCK)
    k, v = kc[slots], vc[slots]  # [L, Hkv, D]
    scores = torch.einsum("hd,khd->hk", q[0], k.repeat_interleave(2, dim=1)) * 16**-0.5
    ref = torch.einsum("hk,khd->hd", scores.softmax(-1), v.repeat_interleave(2, dim=1))
    out = paged_decode_reference(q, kc, vc, tables, lens, block_size=BLOCK)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_splits_depend_on_batch_shape_only():
    cpu = torch.device("cpu")
    assert pick_num_splits(1, 2, cpu) > 1  # one sequence is split over the grid
    assert pick_num_splits(64, 8, cpu) == 1


def test_store_kv_is_bit_exact_and_skips_negative_slots():
    g = torch.Generator().manual_seed(0)
    kc = torch.zeros(32, 3, 16, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    k = torch.randn(5, 3, 16, generator=g).half()
    v = torch.randn(5, 3, 16, generator=g).half()
    slots = torch.tensor([7, -1, 30, 0, -1])
    store_kv_triton(k, v, kc, vc, slots)
    ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
    store_kv_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert torch.equal(kc[30], k[2]) and int((kc != 0).any(-1).any(-1).sum()) == 3
