"""Tiles and split counts of the paged decode kernel: the one place where they are chosen.

Triton-free, so the engine can ask for the split count (part of a captured graph's shape)
without importing triton on a CPU install.
"""

from __future__ import annotations

import functools
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
    # A split takes at least this many tiles: a short sequence then fills fewer splits (the
    # others exit at once) instead of spreading a few keys over every one of them.
    min_split_tiles: int = 1

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


# Measured on one H200 (benchmarks/results/decode_kernel_sweep.json, a Llama-3.1-8B layer:
# 32/8 heads, head dim 128, bf16): one 128K sequence runs best split 64 ways with 64-key tiles
# (141 us, 3.8 TB/s; 128-key tiles 147 us); 32 sequences of 4K best unsplit with 128-key tiles
# (138 us, 3.9 TB/s; 3 splits of 64-key tiles 162 us). So a grid that already fills the GPU
# (batch x Hkv programs >= multiprocessors) is not split and walks wide tiles; a smaller one
# is split to PROGRAMS_PER_SM programs per multiprocessor and walks 64-key tiles.
# At batch 1, 64 splits of a 4K sequence are one 64-key tile each: the kernel took 10 us a
# layer (1.6 TB/s, a torch-profiler trace of the 4K decode step); splits of at least 4 tiles
# leave 16 splits busy there and change nothing past 16K keys.
WIDE = DecodeTileConfig(128, 4, 2)
NARROW = DecodeTileConfig(64, 4, 2, min_split_tiles=4)
INTERPRETER = DecodeTileConfig(16, 4, 1)  # small tiles: CPU tests cross tile and split edges


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Key splits per (sequence, KV head): a function of the batch shape only (never of the
    lengths), so that a captured graph serves every length."""
    programs = max(1, batch * num_kv_heads)
    if device.type != "cuda":
        return max(1, min(MAX_SPLITS, -(-8 // programs)))  # a few: CPU tests merge splits
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-(PROGRAMS_PER_SM * sms) // programs)))


def pick_config(device: torch.device, batch: int, num_kv_heads: int) -> DecodeTileConfig:
    """Tiles for a batch shape (head dims 64 and 128 share the table: no measured reason to
    differ)."""
    if device.type != "cuda":
        return INTERPRETER
    return WIDE if pick_num_splits(batch, num_kv_heads, device) == 1 else NARROW
