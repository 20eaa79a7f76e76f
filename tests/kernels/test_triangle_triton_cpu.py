"""The Triangle Triton kernel under TRITON_INTERPRET=1 (same source as on the GPU).

fp32 and fp16 only: bf16 ``tl.dot`` is wrong in the interpreter (bf16 is tested on the GPU).
Scaled-down masks (4/32/16) with the interpreter's small tiles make tiles really skipped and
the last rows really split; every output is NaN-poisoned first so an unwritten row fails.
"""

from __future__ import annotations

import os
from dataclasses import replace
from itertools import pairwise

import pytest
import torch

pytest.importorskip("triton")

from disagg_kernels.triangle_mix import (
    TriangleParams,
    dense_causal_reference,
    masked_attention_reference,
    merge_attention,
    num_kept_pairs,
    triangle_attention_reference,
    triangle_mask,
)
from disagg_kernels.triangle_mix.configs import INTERPRETER
from disagg_kernels.triangle_mix.launcher import (
    computed_key_columns,
    plan_launch,
    triangle_attention_triton,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests (no CUDA here)"
)

SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)
# Named tolerances: fp32 math in both; fp16 inputs with fp16 P in the second product.
FP32_ATOL = 2e-5
FP16_REL_RMS = 5e-3
FP16_LSE_ATOL = 2e-3


def _qkv(n, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def _run(q, k, v, **kw):
    """Launch into NaN-poisoned destinations and check that every element was written."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))
    triangle_attention_triton(q, k, v, out=out, lse=lse, **kw)
    assert not out.isnan().any(), "unwritten output rows"
    assert not lse.isnan().any(), "unwritten lse entries"
    return out, lse


def _rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _assert_matches(out, lse, ref_out, ref_lse, dtype):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = ~torch.isneginf(ref_lse)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=FP32_ATOL, rtol=0)
    else:
        assert _rel_rms(out, ref_out) <= FP16_REL_RMS
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=FP16_LSE_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 45, 130, 300])
def test_matches_reference_small_mask(n, dtype):
    q, k, v = _qkv(n, 4, 2, 32, dtype, seed=n)
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL),
                    dtype)


@pytest.mark.parametrize("heads", [(3, 3), (6, 2), (8, 1)])
def test_gqa_groups(heads):
    n = 130
    q, k, v = _qkv(n, *heads, 32, torch.float32, seed=7)
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL),
                    torch.float32)


@pytest.mark.parametrize("n", [300, 700])
def test_default_params(n):
    q, k, v = _qkv(n, 2, 1, 64, torch.float32, seed=n)
    out, lse = _run(q, k, v, num_tokens=n)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n),
                    torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "params",
    [TriangleParams(n_sink=0, n_window=4096, n_last=0), TriangleParams(n_sink=4, n_window=8,
                                                                       n_last=4096)],
    ids=["window-covers-all", "all-rows-last"],
)
def test_every_key_kept_is_dense_causal(params, dtype):
    n = 130
    q, k, v = _qkv(n, 4, 2, 32, dtype, seed=11)
    out, lse = _run(q, k, v, num_tokens=n, params=params)
    _assert_matches(out, lse, *dense_causal_reference(q, k, v), dtype)


def test_shards_merge_to_whole():
    """Kernel shards (query x key ranges, as sequence parallelism launches them), merged by
    log-sum-exp, equal dense attention under the explicit Triangle mask (not the kernel's own
    whole-range output: that would compare the kernel with itself)."""
    n = 300
    q, k, v = _qkv(n, 4, 2, 32, torch.float32, seed=13)
    whole_out, whole_lse = masked_attention_reference(q, k, v,
                                                      triangle_mask(n, 0, n, 0, n, SMALL))
    q_cuts, k_cuts = [0, 150, 300], [0, 107, 300]
    for qa, qb in pairwise(q_cuts):
        parts = [
            _run(q[qa:qb], k[ka:kb], v[ka:kb], num_tokens=n, q_start=qa, k_start=ka,
                 params=SMALL)
            for ka, kb in pairwise(k_cuts)
        ]
        out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        torch.testing.assert_close(out, whole_out[qa:qb], atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(lse, whole_lse[:, qa:qb], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("loop", [0, 1, 2])
def test_loop_variants(loop):
    """Every tile-walk variant the config table may pick computes the same function."""
    n = 300
    q, k, v = _qkv(n, 4, 2, 32, torch.float32, seed=23)
    cfg = replace(INTERPRETER, loop=loop)
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL, config=cfg)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL),
                    torch.float32)


def test_gpu_table_tiles():
    """The sm_90 table's tile shape and walk (its register cap applies on CUDA only)."""
    from disagg_kernels.triangle_mix.configs import _HOPPER

    n = 300
    q, k, v = _qkv(n, 8, 2, 32, torch.float32, seed=29)
    table = _HOPPER[128]
    cfg = replace(table, split=replace(table.last_rows, min_split_keys=64))  # several splits
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL, config=cfg)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL),
                    torch.float32)


@pytest.mark.parametrize("n", [7, 130, 300])
def test_last_rows_in_a_launch_of_their_own(n):
    """``split`` set: the last rows run with other tiles and splits in a second launch."""
    q, k, v = _qkv(n, 4, 2, 32, torch.float32, seed=31)
    cfg = replace(INTERPRETER, split=replace(INTERPRETER, block_n=16, max_splits=3,
                                             min_split_keys=32))
    plan = plan_launch(n, n, 2, num_tokens=n, q_start=0, k_start=0, params=SMALL, cfg=cfg)
    assert plan.split_keys % 16 == 0 and (n < 64 or plan.num_splits == 3)
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL, config=cfg)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL),
                    torch.float32)
    # a query shard at the end of a key range, as sequence parallelism launches it
    out, lse = _run(q[n // 2:], k, v, num_tokens=n, q_start=n // 2, params=SMALL, config=cfg)
    ref_out, ref_lse = triangle_attention_reference(q[n // 2:], k, v, num_tokens=n,
                                                    q_start=n // 2, params=SMALL)
    _assert_matches(out, lse, ref_out, ref_lse, torch.float32)


def test_key_range_after_queries_gives_empty_rows():
    n = 300
    q, k, v = _qkv(n, 2, 1, 32, torch.float32, seed=17)
    out, lse = _run(q[:64], k[200:], v[200:], num_tokens=n, k_start=200, params=SMALL)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_explicit_scale():
    n = 45
    q, k, v = _qkv(n, 4, 2, 32, torch.float32, seed=19)
    out, lse = _run(q, k, v, num_tokens=n, params=SMALL, scale=0.3)
    _assert_matches(out, lse, *triangle_attention_reference(q, k, v, num_tokens=n, params=SMALL,
                                                            scale=0.3), torch.float32)


def test_tiles_are_skipped_and_last_rows_split():
    """With 4/32/16 at N=300 the kernel computes fewer columns than dense causal would."""
    n, group = 300, 2
    plan = plan_launch(n, n, group, num_tokens=n, q_start=0, k_start=0, params=SMALL,
                       cfg=INTERPRETER)
    assert plan.num_splits > 1
    cols = computed_key_columns(plan, q_start=0, k_start=0, num_k=n, params=SMALL,
                                cfg=INTERPRETER)
    tile_pairs = cols * INTERPRETER.block_m / group  # (token, key) pairs computed per head
    assert num_kept_pairs(n, SMALL) <= tile_pairs < 0.8 * n * (n + 1) / 2
