"""Tiles and split counts of the paged decode kernel: the one place where they are chosen.

Triton-free, so the engine can ask for the split count (part of a captured graph's shape)
without importing triton on a CPU install.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SPLITS = 64  # the merge kernel folds at most this many partial results
PROGRAMS_PER_SM = 4  # split until the grid holds this many programs per multiprocessor


@dataclass(frozen=True)
class DecodeTileConfig:
    """Launch shape of ``_paged_decode_fwd``."""

    block_n: int  # keys per tile, power of two >= 16
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


# H200 entries: first guesses, re-checked by `benchmarks/decode_itl.py --sweep` (RESULTS.md).
GPU_CONFIGS = {128: DecodeTileConfig(64, 4, 2), 64: DecodeTileConfig(64, 4, 2)}
GPU_DEFAULT = DecodeTileConfig(64, 4, 2)
INTERPRETER = DecodeTileConfig(16, 4, 1)  # small tiles: CPU tests cross tile and split edges


def pick_config(device: torch.device, head_dim: int) -> DecodeTileConfig:
    if device.type != "cuda":
        return INTERPRETER
    return GPU_CONFIGS.get(head_dim, GPU_DEFAULT)


def pick_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head): a function of the batch shape only (never of the
    lengths), so that a captured graph serves every length."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter: a few splits, so CPU tests merge them
    return max(1, min(MAX_SPLITS, -(-target // max(1, batch * num_kv_heads))))
