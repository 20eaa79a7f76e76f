"""Plain-PyTorch fused ops: the CPU path of the engine and the kernels' oracle.

Each function has the contract of its Triton launcher (same in-place effects, same outputs) and
computes in the order the unfused model did, so fp32 results are unchanged by the fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [T, H]`` -> ``weight * x / rms(x)`` in the weight's dtype.

    Normalised in fp32 whatever the dtypes (a bf16 variance loses too much)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(weight.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place, in the residual's dtype), then its RMS norm.

    Returns ``(normed [T, H]`` in the weight's dtype, ``residual)``."""
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps), residual


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` in place (rotate-half convention, as the HF checkpoints expect).

    ``cos``, ``sin`` ``[T, D // 2]`` fp32: the first half of each head is ``x1 cos - x2 sin``,
    the second ``x2 cos + x1 sin``, computed in fp32 and rounded once."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return x


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU's activation), into ``out`` when given (may be ``gate``)."""
    return torch.mul(F.silu(gate), up, out=out)
