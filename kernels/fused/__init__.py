"""Fused elementwise ops of a Llama layer: residual add + RMSNorm, RoPE, SiLU x mul.

CUDA tensors run the Triton kernels (``launcher``); others the PyTorch references, which are
the CPU engine's real path. The Triton launcher is imported lazily: the CPU engine must import
without triton. vLLM's convention for the norms: the residual stream is updated in place.
"""

from __future__ import annotations

import torch

from .reference import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "silu_mul",
    "silu_mul_reference",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [T, H]`` -> its RMS norm ``[T, H]`` in the weight's dtype (fp32 arithmetic)."""
    if not x.is_cuda:
        return rms_norm_reference(x, weight, eps)
    from .launcher import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` in place, then its RMS norm: ``(normed [T, H], residual)``."""
    if not x.is_cuda:
        return add_rms_norm_reference(x, residual, weight, eps)
    from .launcher import rms_norm_triton

    return rms_norm_triton(x, weight, eps, residual=residual), residual


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place by ``cos``, ``sin`` ``[T, D // 2]`` fp32; returns x."""
    if not x.is_cuda:
        return rope_reference(x, cos, sin)
    from .launcher import rope_triton

    return rope_triton(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``, into ``out`` when given (may be ``gate``)."""
    if not gate.is_cuda:
        return silu_mul_reference(gate, up, out)
    from .launcher import silu_mul_triton

    return silu_mul_triton(gate, up, out)
