"""Rotary position embeddings: default, linear and "llama3" frequency scaling.

Frequencies are computed in fp32 and the angles from absolute positions once per forward call
(``rope_cos_sin``: ``[T, head_dim // 2]`` fp32, shared by every layer), so any position up to
the context length works without a precomputed table; the arithmetic follows transformers' so
fp32 results agree to rounding. The rotation itself is a fused op (``disagg_kernels.fused``):
in place, in fp32, without building the rotated copy.
"""

from __future__ import annotations

import math

import torch
from disagg_kernels import fused

from disagg.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``[head_dim // 2]`` fp32 inverse frequencies after the configured scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin ``[T, head_dim // 2]`` for absolute ``positions [T]`` (kept in fp32:
    rounding them to bf16 would put a relative error of 4e-3 into every rotation)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place (rotate-half convention, as the
    HF checkpoints expect)."""
    fused.rope(q, cos, sin)
    fused.rope(k, cos, sin)
