"""Plain-PyTorch paged decode attention and KV store: the CPU path of the engine and the
kernels' oracle.

Each sequence's keys are gathered from its block table and attended with SDPA (native GQA,
no mask: every gathered key is visible to the one query row). Reads lengths on the host, so it
is for CPU engines and tests, never for a captured GPU step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        block_size: int) -> None:
    """Shape contract shared by every implementation (see ``paged_decode_attention``)."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.dim() != 3:
        raise ValueError("q must be [B, Hq, D] and the caches [num_slots, Hkv, D]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError("q and the cache have different head dims")
    if k_cache.shape[1] == 0 or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[1]}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError("q and the caches must share a dtype")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError("block_tables must be [B, max_blocks]")
    if context_lens.shape != (q.shape[0],):
        raise ValueError("context_lens must be [B]")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_size < 1 or k_cache.shape[0] % block_size:
        raise ValueError(f"the cache's {k_cache.shape[0]} rows are not blocks of {block_size}")


def slots_of(block_table_row: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Cache rows (long ``[num_tokens]``) of positions ``0 .. num_tokens-1`` of one sequence."""
    pos = torch.arange(num_tokens, device=block_table_row.device)
    return block_table_row.long()[pos // block_size] * block_size + pos % block_size


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           block_size: int, scale: float | None = None) -> torch.Tensor:
    """Attention of one query row per sequence over its cached keys, computed in fp32.

    q ``[B, Hq, D]``; caches ``[num_blocks * block_size, Hkv, D]``; ``block_tables [B, W]``
    int32; ``context_lens [B]`` int32 (keys ``0 .. len-1``; a row of length 0 gets zeros).
    Returns ``[B, Hq, D]`` in q's dtype.
    """
    check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size)
    out = torch.zeros_like(q)
    for b, length in enumerate(context_lens.tolist()):
        if length == 0:
            continue
        slots = slots_of(block_tables[b], length, block_size)
        keys = k_cache[slots].float().transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        values = v_cache[slots].float().transpose(0, 1).unsqueeze(0)
        row = F.scaled_dot_product_attention(q[b].float()[None, :, None, :], keys, values,
                                             scale=scale, enable_gqa=True)
        out[b] = row[0, :, 0].to(q.dtype)
    return out


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``k_cache[slot_mapping[t]] = k[t]`` (same for v), skipping negative slots."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
