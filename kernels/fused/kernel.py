"""Triton bodies of the fused elementwise ops of a Llama layer (see ``launcher`` for layouts).

All three are memory-bound: each reads its inputs once and writes its outputs once, computing
in fp32 and rounding once on store. Row counts are ``do_not_specialize``: Triton would
otherwise compile a new variant whenever a prompt length changes its divisibility by 16, and
the first request of such a length would pay the compilation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_fwd(
    X, Res, W, Out, stride_x, stride_r, stride_o, num_rows, num_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row: x [BLOCK] (masked to num_cols), fp32 sum of squares.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(Res + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(Res.dtype.element_ty)  # the norm sees the residual as it is stored
        tl.store(Res + row * stride_r + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / num_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (x * rstd * w).to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rope_fwd(
    X, Cos, Sin, stride_xt, stride_xh, stride_ct, num_tokens, num_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: every head of it, x1 / x2 [BLOCK_H, BLOCK_D] (the two halves).
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < num_heads) & (d < half)
    c = tl.load(Cos + t * stride_ct + d, mask=d < half, other=0.0)
    s = tl.load(Sin + t * stride_ct + d, mask=d < half, other=0.0)
    ptr = X + t * stride_xt + h * stride_xh + d
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + half, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows", "stride_g", "stride_u", "stride_o"])
def _silu_mul_fwd(G, U, Out, stride_g, stride_u, stride_o, num_rows, num_cols,
                  BLOCK: tl.constexpr):
    # Program (row, column block): [BLOCK] elements of one row of each of the three [T, C]
    # tensors (rows strided: gate and up may be the halves of one packed product); Out may
    # alias G (each element is read before it is written).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)
