"""Triton bodies of paged decode attention: the split-K attention kernel, the log-sum-exp merge
of its splits, and the store of new K/V rows into the paged cache.

One program = (sequence ``b``, KV head ``hkv``, split ``s``). Its ``GROUP`` query heads share
every K/V tile load (native GQA): the query tile is ``[BLOCK_G, D]`` with rows ``GROUP ..
BLOCK_G-1`` masked (``tl.dot`` needs at least 16 rows). Keys of sequence ``b`` are positions
``0 .. context_lens[b]-1``; position ``p`` lives in cache row ``block_tables[b, p // block_size]
* block_size + p % block_size``, read in the kernel tile by tile.

Split-K (flash-decoding): the ``num_splits`` programs of a (sequence, head) take equal,
``BLOCK_N``-aligned slices of *that sequence's* keys (at least ``MIN_SPLIT_TILES`` tiles each,
so a short sequence leaves the last splits empty), sized from ``context_lens[b]`` on the
device. The grid depends on the batch size only, never on lengths read on the host, so a launch
is CUDA-graph capturable and one long sequence still spreads over every multiprocessor. A split
with no key (short sequence, padded row of length 0) writes ``lse = -inf`` and weight 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
# The running max starts finite: a tile whose keys are all masked then gives
# p = exp2(-inf - finite) = 0 and alpha = 1 instead of exp2(-inf + inf) = nan.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _paged_decode_fwd(
    Q, K, V, BlockTables, ContextLens, Out, WsOut, WsLse,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt,
    stride_ob, stride_oh,
    num_heads_q, block_size, num_splits, qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
    MIN_SPLIT_TILES: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(ContextLens + b)
    tiles = tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N), MIN_SPLIT_TILES)
    per_split = tiles * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    head = hkv * GROUP + offs_g
    g_ok = offs_g < GROUP
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (head * stride_qh)[:, None] + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)  # [BLOCK_G, D]
    bt_row = BlockTables + b.to(tl.int64) * stride_bt
    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for k0 in tl.range(lo, hi, BLOCK_N):
        pos = k0 + offs_n
        ok = pos < hi
        block = tl.load(bt_row + pos // block_size, mask=ok, other=0)
        slot = block.to(tl.int64) * block_size + pos % block_size  # [BLOCK_N] cache rows
        k = tl.load(k_base + slot[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None],
                    other=0.0)  # [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None],
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SPLIT:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2,
                       float("-inf"))
        row = (b.to(tl.int64) * num_heads_q + head) * num_splits + split  # [B, Hq, S] order
        tl.store(WsOut + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None])
        tl.store(WsLse + row, lse, mask=g_ok)
    else:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + (head * stride_oh)[:, None] + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _merge_splits(
    WsOut, WsLse, Out, stride_ob, stride_oh, num_heads_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (sequence, query head): fold its ``num_splits`` partial results."""
    pid = tl.program_id(0)
    b = pid // num_heads_q
    head = pid % num_heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(WsLse + base + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.maximum(tl.max(lse, 0), M_INIT)
    w = tl.math.exp(lse - m)  # 0 for splits that saw no key
    o = tl.load(WsOut + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)  # [BLOCK_S, D]
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
             out.to(Out.dtype.element_ty))


@triton.jit
def _store_kv(
    K, V, KCache, VCache, SlotMapping, num_tokens,
    stride_kt, stride_vt, stride_ct, stride_vct, row_size,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Copy token rows ``[T, Hkv * D]`` (``row_size`` elements) of new K/V to cache rows
    ``slot_mapping[t]``; a negative slot (a padded row of a captured batch) is skipped."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    t_ok = offs_t < num_tokens
    slot = tl.load(SlotMapping + offs_t, mask=t_ok, other=-1)
    ok = (t_ok & (slot >= 0))[:, None] & (offs_r < row_size)[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    dst = slot.to(tl.int64)[:, None]
    k = tl.load(K + t64 * stride_kt + offs_r[None, :], mask=ok)
    v = tl.load(V + t64 * stride_vt + offs_r[None, :], mask=ok)
    tl.store(KCache + dst * stride_ct + offs_r[None, :], k, mask=ok)
    tl.store(VCache + dst * stride_vct + offs_r[None, :], v, mask=ok)
