"""Typed launchers of the paged decode kernels: check inputs, take tiles and splits from
``configs.py``, launch.

Layouts: q ``[B, Hq, D]`` (head_dim contiguous), caches ``[num_blocks * block_size, Hkv, D]``
(rows of ``Hkv * D`` contiguous elements, the layout of ``disagg/kv/paged_cache.py``),
``block_tables [B, W]`` int32 (row-major, W >= blocks of the longest sequence), ``context_lens
[B]`` int32, out ``[B, Hq, D]`` in q's dtype.
"""

from __future__ import annotations

import math

import torch
import triton

from .configs import MAX_SPLITS, DecodeTileConfig, pick_config, pick_num_splits
from .kernel import _merge_splits, _paged_decode_fwd, _store_kv
from .reference import check_decode_inputs

LOG2E = 1.4426950408889634
STORE_BLOCK_T = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, *, block_size: int,
    scale: float | None = None, num_splits: int | None = None,
    config: DecodeTileConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged decode attention with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    Same contract as ``paged_decode_attention``. ``num_splits`` and ``config`` override
    ``configs.py``'s choices (tests, tuning); ``out`` is an optional destination, every element of which
    the call writes.
    """
    check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size)
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if block_tables.stride(-1) != 1 or not context_lens.is_contiguous():
        raise ValueError("block_tables rows and context_lens must be contiguous")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device
            == context_lens.device):
        raise ValueError("all inputs must be on one device")
    batch, num_heads_q, head_dim = q.shape
    num_heads_kv = k_cache.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    group = num_heads_q // num_heads_kv
    cfg = config or pick_config(q.device, batch, num_heads_kv)
    splits = num_splits or pick_num_splits(batch, num_heads_kv, q.device)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [B, Hq, D] in q's dtype with a contiguous last dim")
    if batch == 0:
        return out
    ws_shape = (batch, num_heads_q, splits) if splits > 1 else (1, 1, 1)  # unused: no split
    ws_lse = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
    ws_out = torch.empty((*ws_shape, head_dim), dtype=torch.float32, device=q.device)
    _paged_decode_fwd[(batch, num_heads_kv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, ws_out, ws_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_heads_q, block_size, splits, scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=cfg.block_n, SPLIT=splits > 1, MIN_SPLIT_TILES=cfg.min_split_tiles,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits[(batch * num_heads_q,)](
            ws_out, ws_lse, out, out.stride(0), out.stride(1), num_heads_q, splits,
            HEAD_DIM=head_dim, BLOCK_S=MAX_SPLITS, num_warps=4,
        )
    return out


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``k_cache[slot_mapping[t]] = k[t]`` (same for v) in one launch; negative slots (padded
    rows of a captured batch) are skipped. k, v ``[T, Hkv, D]`` with contiguous rows."""
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[1:] or k_cache.shape != v_cache.shape:
        raise ValueError("k, v must be [T, Hkv, D] rows of the caches' shape")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError("k, v must be in the caches' dtype")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError("slot_mapping must be int64 [T]")
    row = k.shape[1] * k.shape[2]
    for t in (k, v, k_cache, v_cache):
        if t.stride(2) != 1 or t.stride(1) != k.shape[2]:
            raise ValueError("K/V rows must be contiguous [Hkv, D] blocks")
    if k.shape[0] == 0:
        return
    _store_kv[(triton.cdiv(k.shape[0], STORE_BLOCK_T),)](
        k, v, k_cache, v_cache, slot_mapping, k.shape[0],
        k.stride(0), v.stride(0), k_cache.stride(0), v_cache.stride(0), row,
        BLOCK_R=triton.next_power_of_2(row), BLOCK_T=STORE_BLOCK_T, num_warps=4,
    )
