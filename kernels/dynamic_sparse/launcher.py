"""Typed launcher of the block-sparse Triton kernel: checks inputs, picks tiles, launches.

Layouts: q ``[N, Hq, D]``, k/v ``[N, Hkv, D]`` (last dim contiguous; token and head strides
free), ``block_idx [Hkv, Qb, W]`` / ``block_count [Hkv, Qb]`` int32 contiguous
(``Qb = ceil(N / block_size)``), out ``[N, Hq, D]`` in q's dtype. The kernel needs each list
ascending and causal (every listed ``kb <= qb``, no repeats): what ``blocks_from_mask`` and
``select_blocks`` return.
"""

from __future__ import annotations

import math

import torch

from .configs import TileConfig, pick_config
from .kernel import _block_sparse_fwd
from .reference import check_block_inputs

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    block_count: torch.Tensor, *, block_size: int, scale: float | None = None,
    config: TileConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention with the Triton kernel (CUDA, or CPU tensors under
    TRITON_INTERPRET=1); same contract as ``block_sparse_attention_reference``. ``out`` is an
    optional destination every element of which the call writes."""
    check_block_inputs(q, k, v, block_idx, block_count, block_size)
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last (head_dim) dimension")
    if not block_idx.is_contiguous() or not block_count.is_contiguous():
        raise ValueError("block_idx and block_count must be contiguous")
    if not (q.device == k.device == v.device == block_idx.device == block_count.device):
        raise ValueError("all inputs must be on one device")
    n, num_heads_q, head_dim = q.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    group = num_heads_q // k.shape[1]
    cfg = config or pick_config(q.device, block_size, q.dtype)
    if block_size % cfg.block_n or block_size % cfg.block_m:
        raise ValueError(f"tiles {cfg.block_m} x {cfg.block_n} do not divide block_size "
                         f"{block_size}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [N, Hq, D] in q's dtype with a contiguous last dim")
    num_q_blocks = block_idx.shape[1]
    if n == 0:
        return out
    _block_sparse_fwd[(num_heads_q, num_q_blocks * (block_size // cfg.block_m))](
        q, k, v, out, block_idx, block_count,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        n, num_q_blocks, block_idx.shape[2], scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, SEL_BLOCK=block_size, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
