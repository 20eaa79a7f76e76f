"""Typed launchers of the fused Triton ops (CUDA, or CPU tensors under TRITON_INTERPRET=1).

Layouts: rows ``[T, H]`` with a contiguous last dim (row stride free) for the norms and for
SiLU x mul (whose gate and up may be the two halves of one packed ``[T, 2I]`` product); heads
``[T, H, D]`` with a contiguous last dim for RoPE, cos/sin ``[T, D // 2]`` fp32. Launch shapes are chosen here and nowhere else.
"""

from __future__ import annotations

import torch
import triton

from .kernel import _rms_norm_fwd, _rope_fwd, _silu_mul_fwd

SILU_BLOCK = 1024  # elements of a row per program: 8 per thread (16-byte bf16 loads) at 4 warps
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _row_warps(block: int) -> int:
    """Warps for a row of ``block`` elements: ~8 elements per thread, 1 to 16 warps."""
    return max(1, min(16, block // 256))


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape != like.shape:
        raise ValueError(f"{name} must be [T, H] like x {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension")
    if t.device != like.device or t.dtype not in _DTYPES:
        raise ValueError(f"{name}: wrong device or unsupported dtype {t.dtype}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                    residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * h / rms(h)`` of each row, ``h = x`` or, with ``residual``, ``h = residual + x``
    (written back into ``residual`` in its own dtype, which the norm then reads).

    x ``[T, H]``, weight ``[H]``; returns ``out [T, H]`` in the weight's dtype."""
    _check_rows("x", x, x)
    if weight.shape != (x.shape[1],) or weight.device != x.device or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{x.shape[1]}] tensor on x's device")
    if residual is not None:
        _check_rows("residual", residual, x)
    if out is None:
        out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    _check_rows("out", out, x)
    if out.dtype != weight.dtype:
        raise ValueError("out must be in the weight's dtype")
    num_rows, num_cols = x.shape
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(num_cols)
    res = residual if residual is not None else x
    _rms_norm_fwd[(num_rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), num_rows, num_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_row_warps(block),
    )
    return out


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place by ``cos``, ``sin`` ``[T, D // 2]`` fp32; returns x."""
    if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1 or x.dtype not in _DTYPES:
        raise ValueError("x must be [T, H, D] (D even, contiguous last dim, float dtype)")
    num_tokens, num_heads, head_dim = x.shape
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (num_tokens, half) or t.dtype != torch.float32 or t.device != x.device:
            raise ValueError(f"{name} must be fp32 [{num_tokens}, {half}] on x's device")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("cos and sin need equal strides and a contiguous last dim")
    if num_tokens == 0:
        return x
    block_h, block_d = triton.next_power_of_2(num_heads), triton.next_power_of_2(half)
    _rope_fwd[(num_tokens,)](
        x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), num_tokens, num_heads, half,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_row_warps(block_h * block_d * 2),
    )
    return x


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` elementwise for ``[T, C]`` rows (same shape and dtype, contiguous
    last dims, any row strides), into ``out`` when given (``out`` may be ``gate`` itself)."""
    if gate.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {gate.dtype}")
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.dim() != 2:
        raise ValueError(f"gate must be [T, C], got {tuple(gate.shape)}")
    for name, t in (("up", up), ("out", out)):
        _check_rows(name, t, gate)
        if t.dtype != gate.dtype:
            raise ValueError(f"{name} must be in gate's dtype {gate.dtype}")
    _check_rows("gate", gate, gate)
    num_rows, num_cols = gate.shape
    if num_rows and num_cols:
        grid = (num_rows, triton.cdiv(num_cols, SILU_BLOCK))
        _silu_mul_fwd[grid](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                            num_rows, num_cols, BLOCK=SILU_BLOCK, num_warps=4)
    return out
