"""Tile configurations of the Triangle kernel: the one place where tiles are chosen.

GPU entries were picked by measurement on one H200 (``benchmarks/kernels/triangle_attention.py
--sweep``; see benchmarks/RESULTS.md). The interpreter entry is small so that CPU tests with
scaled-down masks really skip tiles and really split the last rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of ``_triangle_fwd``."""

    block_m: int  # query rows per program: (token, head-in-group) pairs, power of two
    block_n: int  # keys per window/split tile
    block_s: int  # keys per sink tile (sinks are few: a narrow tile wastes less)
    num_warps: int
    num_stages: int
    max_splits: int  # at most this many key slices per dense last-row tile
    min_split_keys: int  # ...each at least this many keys (fewer, longer programs otherwise)
    loop: int = 0  # 0: three loops (edge/interior/edge); 1: one loop, mask all; 2: one loop,
    #                mask edge tiles only (see kernel.py)
    maxnreg: int | None = None  # registers per thread (CUDA): 128 at 8 warps fits 2 programs
    #                             per multiprocessor
    split: TileConfig | None = None  # set: the dense last rows run in a launch of their own with
    #   these tiles, warps, stages and splits (same block_m); None: one launch runs both

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_s"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.min_split_keys % self.block_n:
            raise ValueError("min_split_keys must be a multiple of block_n")
        if self.loop not in (0, 1, 2):
            raise ValueError(f"loop must be 0, 1 or 2, got {self.loop}")
        if self.split is not None and (self.split.block_m != self.block_m or self.split.split):
            raise ValueError("split needs the same block_m and no split of its own")

    @property
    def last_rows(self) -> TileConfig:
        """The configuration the last rows' split programs run with."""
        return self.split or self

    @classmethod
    def from_dict(cls, fields: dict) -> TileConfig:
        """Inverse of ``dataclasses.asdict`` (JSON configs of the benchmarks)."""
        split = fields.get("split")
        return cls(**{**fields, "split": cls.from_dict(split) if split else None})


INTERPRETER = TileConfig(
    block_m=64, block_n=32, block_s=16, num_warps=4, num_stages=1, max_splits=4, min_split_keys=64
)

# (head_dim) -> config for bf16/fp16 on sm_90. Measured on one H200 (32/8 heads, head dim 128,
# 32K and 128K): a band program walks only ~18 key tiles, so its Q load, pipeline ramp and
# epilogue are exposed unless a second program shares the multiprocessor. 128x32 tiles capped
# at 128 registers (no spills, 80 KiB shared memory) fit two 8-warp programs per SM and beat
# the one-program 128x64 tiles (230 registers) by 3-5% at 128K; uncapped, the same tiles take
# 148 registers (one program) and run 15% slower. One loop with edge-only masking ahead of
# masking every tile, ~ three loops; 3 stages ahead of 2 and 4. The dense last rows are long
# rows, not short walks: they run in a launch of their own with one-program 128x64 tiles,
# 4 stages (~4.00 vs 4.03-4.56 ms at 128K in the same sweep), 4 key splits (of at least 2K
# keys) from 8K on: about one wave of split programs, short enough not to trail the band at
# 8K-16K (32K: 4 of 8K, ~1.00 ms, against ~1.35 for one split of 32K).
# Head dim 64 reuses the choice (not swept).
_LAST_ROWS = TileConfig(128, 64, 16, num_warps=8, num_stages=4, max_splits=4,
                        min_split_keys=2048, loop=2)
_HOPPER: dict[int, TileConfig] = {
    d: TileConfig(128, 32, 16, num_warps=8, num_stages=3, max_splits=4, min_split_keys=8192,
                  loop=2, maxnreg=128, split=_LAST_ROWS)
    for d in (64, 128)
}
_FALLBACK = TileConfig(64, 32, 16, num_warps=4, num_stages=2, max_splits=32, min_split_keys=4096)


def pick_config(device: torch.device, head_dim: int, group: int, dtype: torch.dtype) -> TileConfig:
    """Tile configuration for one launch; ``block_m`` grows to hold at least one query group."""
    if device.type != "cuda":
        cfg = INTERPRETER
    elif dtype == torch.float32:
        cfg = _FALLBACK  # fp32 is a test/debug path: smaller tiles fit the registers
    else:
        cfg = _HOPPER.get(head_dim, _FALLBACK)
    if cfg.block_m < group:
        block_m = 1 << (group - 1).bit_length()
        split = replace(cfg.split, block_m=block_m) if cfg.split else None
        cfg = replace(cfg, block_m=block_m, split=split)
    return cfg
