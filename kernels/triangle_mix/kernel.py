"""Triton bodies of Triangle attention (forward): one band/split kernel and one merge kernel.

Tile of queries: ``BLOCK_M`` rows packed as ``(token, head-in-group)`` pairs, so the ``GROUP``
query heads of one KV head share every K/V tile load (native GQA): row ``m`` is token
``t0 + m // GROUP``, query head ``hkv * GROUP + m % GROUP``; ``BLOCK_M // GROUP`` tokens per tile.

The grid holds two kinds of program, split programs first (program ids below
``num_last_tiles * num_splits * Hkv``), band programs after them:
- split programs: the dense last rows against one slice (``split_keys`` keys) of their key range;
  they write fp32 partial ``(out, lse)`` to a workspace that ``_merge_splits`` folds by
  log-sum-exp, so the long rows are spread over the whole GPU instead of trailing the launch.
- band programs: the middle rows against the sink tile(s) and their window band only.
The launcher runs both in one launch (long split programs start first), or, when the config
has ``split``, the split programs in a launch of their own with other tiles (a grid cut after
them), then the band (``num_last_tiles = 0``).

A band program walks few tiles (about twenty), so pipeline ramps matter as much as mask
arithmetic; ``configs.py`` sizes the band's tiles so that two programs share a multiprocessor.
``LOOP`` picks how the tiles are walked: 0 = three loops [masked lower edge | unmasked interior
| masked diagonal]; 1 = one loop, every tile masked; 2 = one loop, edge tiles masked under a
branch. The sink keys get their own loop of narrow ``BLOCK_S`` tiles (walking them as one
more ``BLOCK_N`` tile of the band loop measured about 20% slower on the H200). ``configs.py``
picks tiles and ``LOOP`` by measurement.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
# The running max starts finite: a row whose first tiles are all masked then gets
# p = exp2(-inf - finite) = 0 and alpha = 1 instead of exp2(-inf + inf) = nan.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, limit, full_lo, full_hi,
    i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
    BLOCK: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi) (step BLOCK) of relative key indices.

    The mask is ``kk < limit and j <= i and (j < n_sink or i - j <
    n_window)``; MASK 0: no tile is masked (all must be fully kept and in range); 1: every
    tile is; 2: tiles outside the fully-kept loop range [full_lo, full_hi) are.
    """
    offs_n = tl.arange(0, BLOCK)
    k_offs = offs_n[:, None] * stride_kt + offs_d[None, :]  # [BLOCK, D], int32 within a tile
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    for k0 in tl.range(lo, hi, BLOCK):
        k_tile = k_base + tl.cast(k0, tl.int64) * stride_kt
        v_tile = v_base + tl.cast(k0, tl.int64) * stride_vt
        kk = k0 + offs_n
        in_range = kk < limit
        if MASK == 0:
            k = tl.load(k_tile + k_offs)
        else:
            k = tl.load(k_tile + k_offs, mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK]
        if MASK == 1:
            j = (j_base + kk)[None, :]
            i = i_abs[:, None]
            keep = in_range[None, :] & (j <= i) & ((j < n_sink) | (i - j < n_window))
            s = tl.where(keep, s, float("-inf"))
        if MASK == 2:  # noqa: SIM102 (compile-time choice, then a run-time branch)
            if (k0 < full_lo) | (k0 >= full_hi):
                j = (j_base + kk)[None, :]
                i = i_abs[:, None]
                keep = in_range[None, :] & (j <= i) & ((j < n_sink) | (i - j < n_window))
                s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK == 0:
            v = tl.load(v_tile + v_offs)
        else:
            v = tl.load(v_tile + v_offs, mask=in_range[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, limit, full_lo, full_hi,
    i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
    BLOCK: tl.constexpr, LOOP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Loop tiles [lo, hi), of which [full_lo, full_hi) are fully kept (lo <= full_lo <=
    full_hi <= hi, all BLOCK-aligned but hi). LOOP 0: three loops (masked, unmasked, masked);
    1: one loop masking every tile; 2: one loop masking only edge tiles."""
    if LOOP == 0:
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, full_lo, limit, 0, 0,
            i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
            BLOCK, 1, DOT_PREC)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, full_lo, full_hi, limit, 0,
            0, i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
            BLOCK, 0, DOT_PREC)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, full_hi, hi, limit, 0, 0,
            i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
            BLOCK, 1, DOT_PREC)
    else:
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, limit, full_lo,
            full_hi, i_abs, j_base, n_sink, n_window, qk_scale, offs_d,
            BLOCK, LOOP, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _triangle_fwd(
    Q, K, V, Out, Lse, WsOut, WsLse,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_q, num_k, num_heads_q, q_start, k_start, n_sink, n_window,
    band_rows, num_band_tiles, num_last_tiles, num_splits, split_keys, last_keys,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, LOOP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile
    pid = tl.program_id(0)
    num_split_progs = num_last_tiles * num_splits * (num_heads_q // GROUP)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    is_split = pid < num_split_progs
    if is_split:
        split = pid % num_splits
        rest = pid // num_splits
        t0 = band_rows + (rest % num_last_tiles) * TOKENS
        hkv = rest // num_last_tiles
        t_hi = num_q
    else:
        rest = pid - num_split_progs
        t0 = (rest % num_band_tiles) * TOKENS
        hkv = rest // num_band_tiles
        t_hi = tl.minimum(t0 + TOKENS, band_rows)
        split = pid * 0

    tok = t0 + offs_m // GROUP
    head = hkv * GROUP + offs_m % GROUP
    row_ok = (offs_m < TOKENS * GROUP) & (tok < t_hi)
    q_ptrs = Q + tok.to(tl.int64)[:, None] * stride_qt + (head * stride_qh)[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    i_abs = q_start + tok
    k_base = K + hkv.to(tl.int64) * stride_kh
    v_base = V + hkv.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Both kinds of program run the same loops (one set of shared-memory buffers); only the
    # scalar bounds differ. Loop tiles [lo, hi) of which [full_lo, full_hi) are fully kept,
    # then sink keys [0, sink_end) in narrow tiles.
    if is_split:
        # Dense last rows, keys [lo, hi): a tile is fully kept when its last key is at or before
        # the tile's first row; the rest (diagonal, range end) is masked. No sink/window rule.
        lo = split * split_keys
        hi = tl.minimum(lo + split_keys, last_keys)
        limit = hi
        r0 = q_start + t0
        full_lo = lo
        full_hi = lo + tl.maximum(tl.minimum(hi - lo, r0 - k_start + 1 - lo), 0) // BLOCK_N * BLOCK_N
        sink_end = pid * 0
        sinks = pid * 0
        window = pid * 0 + (1 << 30)
    else:
        qa0 = q_start + t0
        qa1 = q_start + t_hi - 1
        # Window band in relative key indices: [lo, hi), tiles aligned to BLOCK_N from key 0.
        lo = tl.maximum(qa0 - n_window + 1 - k_start, 0) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(qa1 + 1 - k_start, num_k), lo)
        limit = num_k
        # Interior tiles: every row keeps every key (inside all windows, before all rows).
        full_lo = tl.cdiv(tl.maximum(qa1 - n_window + 1 - k_start, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(lo, full_lo), hi)
        c_lim = tl.minimum(tl.maximum(qa0 + 1 - k_start, 0), num_k)
        full_hi = tl.maximum(full_lo, c_lim // BLOCK_N * BLOCK_N)
        # Sink keys that lie before the band.
        sink_end = tl.minimum(tl.minimum(tl.maximum(n_sink - k_start, 0), lo), num_k)
        sinks = n_sink
        window = n_window
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, 0, sink_end, sink_end, 0, 0,
        i_abs, k_start, sinks, window, qk_scale, offs_d, BLOCK_S, 1, DOT_PREC)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, limit, full_lo, full_hi,
        i_abs, k_start, sinks, window, qk_scale, offs_d, BLOCK_N, LOOP, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    if is_split:
        num_rows = num_q - band_rows
        row = (tok - band_rows).to(tl.int64)
        ws_row = (split.to(tl.int64) * num_rows + row) * num_heads_q + head
        tl.store(WsOut + ws_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        ws_lse = (split.to(tl.int64) * num_heads_q + head) * num_rows + row
        tl.store(WsLse + ws_lse, lse, mask=row_ok)
    else:
        o_ptrs = Out + tok.to(tl.int64)[:, None] * stride_ot + (head * stride_oh)[:, None]
        tl.store(o_ptrs + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + head.to(tl.int64) * num_q + tok, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    WsOut, WsLse, Out, Lse, stride_ot, stride_oh,
    num_q, num_heads_q, band_rows, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Fold the split programs' partial results by log-sum-exp, ``BLOCK_R`` (last row, query
    head) pairs per program; pair ``r`` is row ``r // num_heads_q``, head ``r % num_heads_q``."""
    num_rows = num_q - band_rows
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs_r < num_rows * num_heads_q
    row = offs_r // num_heads_q
    head = offs_r % num_heads_q
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], M_INIT, dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s in range(num_splits):
        base = tl.cast(s, tl.int64) * num_rows * num_heads_q
        lse_s = tl.load(WsLse + base + head.to(tl.int64) * num_rows + row, mask=ok,
                        other=float("-inf"))
        o_s = tl.load(WsOut + (base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        total = total * alpha + w
        m = m_new
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tok = (band_rows + row).to(tl.int64)
    o_ptrs = Out + (tok * stride_ot + head * stride_oh)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok[:, None])
    tl.store(Lse + head.to(tl.int64) * num_q + tok, lse, mask=ok)
