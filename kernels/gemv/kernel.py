"""Triton body of a skinny matrix product: ``y [M, N] = x [M, K] @ w [N, K]^T (+ b)`` for the few
rows of a decode step, where the weight read is the whole cost.

One program = ``BLOCK_N`` output columns (weight rows) over all of K: many small programs fill
every multiprocessor even when N is only 4096 (cuBLAS's 64-column tiles leave a third of an
H200 idle there, or split K and add a reduction kernel). One row (``BLOCK_M == 1``) reduces
``x * w`` with ``tl.sum``; more rows pad to 16 and use ``tl.dot``. fp32 accumulation, one
rounding to the output dtype at the end, as cuBLAS.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gemv_fwd(
    X, W, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if BLOCK_M == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
