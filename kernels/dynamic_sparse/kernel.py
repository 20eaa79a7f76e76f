"""Triton body of block-sparse causal attention (forward), the dense layers' dynamic sparsity.

One program = one query block (``BLOCK_M`` tokens) of one query head. It walks the key blocks
listed for its KV head (``block_idx [Hkv, Qb, W]``, ``block_count [Hkv, Qb]``) in
``BLOCK_N``-key tiles with an online softmax; only the diagonal block needs the causal mask
(blocks before it are fully visible and in range; a listed block past it is masked out).
Query heads of one KV head have adjacent program ids (grid axis 0 = query head), so the group's
reads of the same K/V tiles meet in L2; query blocks run last-first (the longest rows start
first and do not trail the launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The running max starts finite: a row whose first tiles are all masked then gets
# p = exp2(-inf - finite) = 0 and alpha = 1 instead of exp2(-inf + inf) = nan.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, BlockIdx, BlockCount,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_tokens, num_q_blocks, max_blocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    head = tl.program_id(0)
    qb = num_q_blocks - 1 - tl.program_id(1)
    hkv = head // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = qb * BLOCK_M + offs_m
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
    for i in range(count):
        kb = tl.load(BlockIdx + list_base + i)
        for t in tl.static_range(BLOCK_M // BLOCK_N):
            k0 = kb * BLOCK_M + t * BLOCK_N
            k_tile = k_base + tl.cast(k0, tl.int64) * stride_kt
            v_tile = v_base + tl.cast(k0, tl.int64) * stride_vt
            if kb >= qb:  # the diagonal block: causal mask, and the range may end inside it
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
            m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + rows.to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
