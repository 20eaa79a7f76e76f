"""Triton body of block-sparse causal attention (forward), the dense layers' dynamic sparsity.

One program = ``BLOCK_M`` query rows (one slice of a ``SEL_BLOCK``-token query block) of one
query head. Its key blocks come from the list of its KV head (``block_idx [Hkv, Qb, W]``,
``block_count [Hkv, Qb]``), ascending and causal (``kb <= qb``, as ``blocks_from_mask`` makes
them), so the list is: blocks fully before the diagonal, then the diagonal block if kept.
- The blocks before the diagonal run as one flat loop over ``BLOCK_N``-key tiles with no mask
  and no branch (the loop software-pipelines: the next tile's loads are issued while this one
  computes).
- The diagonal block runs last, masked, and only up to this slice's last row.
Online softmax in base 2 (``qk_scale`` includes log2 e). Query heads of one KV head have
adjacent program ids (grid axis 0 = query head), so the group's reads of the same K/V tiles
meet in L2; query blocks run last-first (the longest rows start first and do not trail the
launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The running max starts finite: a row whose first tiles are all masked then gets
# p = exp2(-inf - finite) = 0 and alpha = 1 instead of exp2(-inf + inf) = nan.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _attend_tile(q, k_tile, v_tile, k_offs, v_offs, acc, m_i, l_i, qk_scale, rows, k0,
                 num_tokens, offs_n, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One ``BLOCK_N``-key tile into the running (acc, m, l)."""
    if MASKED:  # the diagonal block: causal mask, and the range may end inside it
        kk = k0 + offs_n
        k = tl.load(k_tile + k_offs, mask=(kk < num_tokens)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(kk[None, :] <= rows[:, None], s, float("-inf"))
        v = tl.load(v_tile + v_offs, mask=(kk < num_tokens)[:, None], other=0.0)
    else:
        k = tl.load(k_tile + k_offs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        v = tl.load(v_tile + v_offs)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


# Lengths and list widths are not specialized on (a 128K prompt reuses the build of a short
# one: no compilation inside a long request).
@triton.jit(do_not_specialize=["num_tokens", "num_q_blocks", "max_blocks"])
def _block_sparse_fwd(
    Q, K, V, Out, BlockIdx, BlockCount,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_tokens, num_q_blocks, max_blocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SEL_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    SLICES: tl.constexpr = SEL_BLOCK // BLOCK_M
    TILES: tl.constexpr = SEL_BLOCK // BLOCK_N
    head = tl.program_id(0)
    pid = num_q_blocks * SLICES - 1 - tl.program_id(1)
    qb = pid // SLICES
    row0 = pid * BLOCK_M  # = qb * SEL_BLOCK + slice * BLOCK_M
    hkv = head // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = row0 + offs_m
    row_ok = rows < num_tokens
    q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh
    k_offs = offs_n[:, None] * stride_kt + offs_d[None, :]  # [BLOCK_N, D]
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    list_base = (hkv.to(tl.int64) * num_q_blocks + qb) * max_blocks
    count = tl.load(BlockCount + hkv * num_q_blocks + qb)
    last = tl.load(BlockIdx + list_base + tl.maximum(count - 1, 0), mask=count > 0, other=-1)
    has_diag = (last == qb).to(tl.int32)
    for j in range((count - has_diag) * TILES):  # blocks before the diagonal: no mask
        kb = tl.load(BlockIdx + list_base + j // TILES)
        k0 = kb * SEL_BLOCK + (j % TILES) * BLOCK_N
        acc, m_i, l_i = _attend_tile(
            q, k_base + tl.cast(k0, tl.int64) * stride_kt,
            v_base + tl.cast(k0, tl.int64) * stride_vt, k_offs, v_offs, acc, m_i, l_i,
            qk_scale, rows, k0, num_tokens, offs_n, False, DOT_PREC)
    if has_diag:  # the diagonal block, up to this slice's last row
        diag_tiles = tl.cdiv(row0 + BLOCK_M - qb * SEL_BLOCK, BLOCK_N)
        for t in range(diag_tiles):
            k0 = qb * SEL_BLOCK + t * BLOCK_N
            acc, m_i, l_i = _attend_tile(
                q, k_base + tl.cast(k0, tl.int64) * stride_kt,
                v_base + tl.cast(k0, tl.int64) * stride_vt, k_offs, v_offs, acc, m_i, l_i,
                qk_scale, rows, k0, num_tokens, offs_n, True, DOT_PREC)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + rows.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
