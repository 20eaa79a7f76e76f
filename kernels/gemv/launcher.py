"""Typed launcher of the skinny matrix product (CUDA, or CPU tensors under TRITON_INTERPRET=1).

Layouts: ``x [M, K]`` with a contiguous last dim (its row stride free: the down projection
reads the gate half of a packed ``[M, 2I]`` product), ``weight [N, K]`` contiguous rows (an
``nn.Linear`` weight), ``bias [N]`` or None; returns a new ``[M, N]`` in x's dtype. Tiles are
a ``GemvConfig``: the tuner (``disagg.models.linear``) picks one per shape by measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .kernel import _gemv_fwd

MAX_ROWS = 16  # rows past this are not "skinny": cuBLAS's tiles are made for them


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Candidates the tuner times (weight-read bound: 8-32 columns per program keeps 2-4 waves of
# programs on an H200 at N = 4096; 256-512 elements of K per load keep 16-byte loads).
CONFIGS = (GemvConfig(8, 512), GemvConfig(16, 512), GemvConfig(16, 256), GemvConfig(32, 256),
           GemvConfig(16, 512, num_stages=4), GemvConfig(32, 128, num_stages=4))
INTERPRETER = GemvConfig(16, 32, num_warps=1, num_stages=1)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: GemvConfig | None = None, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"{m} rows: the skinny product takes at most {MAX_ROWS}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError("x and weight must share dtype and device")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}]")
    cfg = config or (INTERPRETER if not x.is_cuda else CONFIGS[1])
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be [{m}, {n}] in x's dtype with a contiguous last dim")
    if m == 0:
        return out
    block_m = 1 if m == 1 else 16
    block_n = cfg.block_n if m == 1 else max(cfg.block_n, 16)  # tl.dot needs 16
    _gemv_fwd[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=cfg.block_k, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
