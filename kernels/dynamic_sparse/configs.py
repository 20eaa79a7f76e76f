"""Tile configurations of the block-sparse kernel: the one place where tiles are chosen.

``BLOCK_M`` is the selection block (``DynamicSparseParams.block_size``): one program per query
block. The key tile ``block_n`` divides it. The interpreter entry keeps CPU tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of ``_block_sparse_fwd`` for one selection block size."""

    block_n: int  # keys per tile (divides the block size)
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


INTERPRETER = TileConfig(block_n=16, num_warps=4, num_stages=1)
# sm_90, bf16/fp16: 128-token query blocks against 64-key tiles, 8 warps, 3 stages: the shape
# Triton's own Hopper flash-attention tutorial settles on for head dim 64-128 (not swept here).
_HOPPER = TileConfig(block_n=64, num_warps=8, num_stages=3)
_FP32 = TileConfig(block_n=32, num_warps=4, num_stages=2)  # test/debug path: fits registers


def pick_config(device: torch.device, block_size: int, dtype: torch.dtype) -> TileConfig:
    if device.type != "cuda":
        cfg = INTERPRETER
    elif dtype == torch.float32:
        cfg = _FP32
    else:
        cfg = _HOPPER
    if block_size % cfg.block_n:
        cfg = TileConfig(block_n=min(cfg.block_n, block_size), num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return cfg
