"""Paged decode attention: split-K Triton kernel over block tables, PyTorch reference, KV store.

One query row per sequence attends to that sequence's cached keys ``0 .. context_lens[b]-1``,
found through its block table (see ``kernel.py``). CUDA tensors run the Triton kernels, others
the PyTorch reference; the launchers are imported lazily so the CPU engine imports without
triton.
"""

from __future__ import annotations

import torch

from .configs import pick_num_splits
from .reference import paged_decode_reference, slots_of, store_kv_reference

__all__ = [
    "paged_decode_attention",
    "paged_decode_reference",
    "pick_num_splits",
    "slots_of",
    "store_kv",
    "store_kv_reference",
]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           block_size: int, scale: float | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """Decode attention ``[B, Hq, D]`` of q ``[B, Hq, D]`` over caches ``[num_blocks *
    block_size, Hkv, D]`` through ``block_tables [B, W]`` / ``context_lens [B]`` (int32).
    ``num_splits`` (CUDA only) fixes the split-K count; None: chosen from the batch shape."""
    if not q.is_cuda:
        return paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens,
                                      block_size=block_size, scale=scale)
    from .launcher import paged_decode_attention_triton

    return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                         block_size=block_size, scale=scale,
                                         num_splits=num_splits)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V rows ``[T, Hkv, D]`` at cache rows ``slot_mapping [T]`` (int64; negative:
    skipped), bit-exact."""
    if not k.is_cuda:
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    from .launcher import store_kv_triton

    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
