"""Dynamic block-sparse attention on a CUDA GPU: bf16 against the fp32 reference (same
bf16-rounded inputs), NaN-poisoned outputs, relative RMS <= 5e-3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disagg_kernels.dynamic_sparse import (
    DynamicSparseParams,
    antidiagonal_block_scores,
    block_sparse_attention_reference,
    blocks_from_mask,
    dynamic_sparse_attention,
    select_blocks,
    vertical_slash_block_scores,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REL_RMS = 5e-3


def _qkv(n, hq, hkv, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(n, h, d, generator=g, device="cuda").to(torch.bfloat16)
                 for h in (hq, hkv, hkv))


def _rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _launch(q, k, v, idx, cnt, bs):
    from disagg_kernels.dynamic_sparse.launcher import block_sparse_attention_triton

    out = torch.full_like(q, float("nan"))
    block_sparse_attention_triton(q, k, v, idx, cnt, block_size=bs, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten output rows"
    return out


@pytest.mark.parametrize("n,hq,hkv,d", [(4133, 32, 8, 128), (2111, 9, 3, 64)])
def test_bf16_matches_fp32_reference(n, hq, hkv, d):
    q, k, v = _qkv(n, hq, hkv, d, seed=n)
    nb = -(-n // 128)
    keep = torch.rand(hkv, nb, nb, device="cuda") < 0.3
    idx, cnt = blocks_from_mask(keep | torch.eye(nb, dtype=torch.bool, device="cuda"))
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt,
                                           block_size=128)
    assert _rel_rms(_launch(q, k, v, idx, cnt, 128), ref) <= REL_RMS


def test_every_block_kept_is_sdpa():
    q, k, v = _qkv(3000, 32, 8, 128, seed=1)
    nb = -(-3000 // 128)
    idx, cnt = blocks_from_mask(torch.ones(8, nb, nb, dtype=torch.bool, device="cuda"))
    dense = F.scaled_dot_product_attention(
        *(x.float().transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
        enable_gqa=True)[0].transpose(0, 1)
    assert _rel_rms(_launch(q, k, v, idx, cnt, 128), dense) <= REL_RMS


@pytest.mark.parametrize("method", ["antidiagonal", "vertical_slash"])
def test_dynamic_selection_end_to_end(method):
    q, k, v = _qkv(8192, 9, 3, 64, seed=2)
    params = DynamicSparseParams(density=0.3, method=method)
    out, cnt = dynamic_sparse_attention(q, k, v, params=params)
    # The same selection, recomputed, then the reference over it.
    scores = antidiagonal_block_scores(q, k, block_size=128, stride=16) \
        if method == "antidiagonal" else vertical_slash_block_scores(q, k, block_size=128)
    idx_ref, cnt_ref = select_blocks(scores, params)
    assert torch.equal(cnt, cnt_ref)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx_ref, cnt_ref,
                                           block_size=128)
    assert _rel_rms(out, ref) <= REL_RMS
