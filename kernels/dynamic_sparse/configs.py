"""Tile configurations of the block-sparse kernel: the one place where tiles are chosen.

A program takes ``block_m`` query rows of one selection block (``DynamicSparseParams.block_size``)
and walks its key blocks in ``block_n``-key tiles; both divide the selection block (a smaller
one is clipped to it). The interpreter entry keeps CPU tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of ``_block_sparse_fwd`` for one selection block size."""

    block_n: int  # keys per tile (divides the block size)
    num_warps: int
    num_stages: int
    block_m: int = 128  # query rows per program (divides the block size)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


INTERPRETER = TileConfig(block_n=16, num_warps=4, num_stages=1, block_m=16)
# sm_90, bf16/fp16: 128-row slices against 128-key tiles, 8 warps, 3 stages: the fastest of
# ``benchmarks.dynamic_sparse tiles`` at 128K, density 0.27 (441 TFLOP/s; 128 x 64: 357).
_HOPPER = TileConfig(block_n=128, num_warps=8, num_stages=3, block_m=128)
_FP32 = TileConfig(block_n=32, num_warps=4, num_stages=2)  # test/debug path: fits registers


def pick_config(device: torch.device, block_size: int, dtype: torch.dtype) -> TileConfig:
    if device.type != "cuda":
        cfg = INTERPRETER
    elif dtype == torch.float32:
        cfg = _FP32
    else:
        cfg = _HOPPER
    return _clip(cfg, block_size)


def _clip(cfg: TileConfig, block_size: int) -> TileConfig:
    """``cfg`` with tiles no larger than the selection block (powers of two: they divide it)."""
    return replace(cfg, block_m=min(cfg.block_m, block_size),
                   block_n=min(cfg.block_n, block_size))
