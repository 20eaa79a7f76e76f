"""Attention metadata of one decode-engine forward over the paged KV cache.

One forward serves a mixed batch: decode rows (one new token each, of many sequences) first,
then local-prefill segments (a prompt, a chunk of one, or a preempted sequence being
recomputed). For every layer, ``attend``:
1. stores the call's new K/V at ``slot_mapping`` (their cache rows; a negative slot is a padded
   row of a captured batch and is not stored);
2. decode rows: one paged decode attention call for all of them (``disagg_kernels.paged_decode``:
   the split-K Triton kernel on CUDA, reading each row's keys through its block table in place;
   the PyTorch reference on CPU), native GQA, ragged lengths;
3. prefill segments: causal attention over the segment's keys -- the call's own K/V for a
   fresh prompt (``dense.py``), rows gathered from the cache for a later chunk, whose queries
   sit at the end of the key range (``causal_lower_right``: no ``N x M`` mask on CUDA).
Decode is always dense, whatever attention the prefill that produced the KV used.

The tensors of a pure-decode forward have fixed shapes for a given batch size, so the decode
runner builds this object once over persistent buffers and captures the forward in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from disagg_kernels.paged_decode import paged_decode_attention, store_kv
from torch.nn.attention.bias import causal_lower_right

from disagg.attention.dense import dense_attention
from disagg.kv.block_pool import BlockTable
from disagg.kv.paged_cache import PagedKVCache


@dataclass(frozen=True)
class SequenceSlice:
    """One sequence's part of a forward: ``num_new_tokens`` tokens at positions
    ``num_computed_tokens ..``; its earlier tokens' K/V are already in the cache."""

    num_computed_tokens: int
    num_new_tokens: int
    block_table: BlockTable

    @property
    def num_tokens(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(frozen=True)
class PrefillSegment:
    """Rows ``token_start ..`` of the call at positions ``q_start ..``; ``key_slots`` are the
    cache rows of positions ``0 .. q_start + num_tokens - 1``, or None for a fresh prompt."""

    token_start: int
    num_tokens: int
    q_start: int
    key_slots: torch.Tensor | None


@dataclass(frozen=True)
class PagedAttention:
    """Per-forward metadata; ``PagedAttention.build`` makes it for any batch, the decode
    runner makes it over its persistent buffers for captured pure-decode batches."""

    cache: PagedKVCache
    scale: float
    slot_mapping: torch.Tensor  # [T] int64 cache row of each new token (negative: not stored)
    num_decode_tokens: int  # the first B rows of the call are decode rows
    block_tables: torch.Tensor  # [B, W] int32 blocks of each decode row's sequence
    context_lens: torch.Tensor  # [B] int32 keys of each decode row, its own included
    prefill_segments: tuple[PrefillSegment, ...] = ()
    num_splits: int | None = None  # split-K of the decode kernel; None: from the batch shape

    @classmethod
    def build(cls, cache: PagedKVCache, scale: float,
              sequences: Sequence[SequenceSlice]) -> PagedAttention:
        """Metadata for a call whose tokens are ``sequences``' new tokens, in that order;
        every sequence with one new token must come before every one with more."""
        device = cache.device
        num_decode = 0
        while num_decode < len(sequences) and sequences[num_decode].num_new_tokens == 1:
            num_decode += 1
        if any(s.num_new_tokens == 1 for s in sequences[num_decode:]):
            raise ValueError("decode rows (one new token) must come first in the batch")
        decode = sequences[:num_decode]
        new_slots = [cache.slot_mapping(s.block_table, s.num_computed_tokens, s.num_tokens)
                     for s in sequences]
        slot_mapping = torch.cat(new_slots) if sequences \
            else torch.empty(0, dtype=torch.long, device=device)
        width = max((s.block_table.num_blocks for s in decode), default=0)
        tables = [s.block_table.block_ids + [0] * (width - s.block_table.num_blocks)
                  for s in decode]
        block_tables = torch.tensor(tables, dtype=torch.int32).reshape(num_decode, width)
        context_lens = torch.tensor([s.num_tokens for s in decode], dtype=torch.int32)
        segments, token_start = [], num_decode
        for s in sequences[num_decode:]:
            fresh = s.num_computed_tokens == 0
            key_slots = None if fresh else cache.slot_mapping(s.block_table, 0, s.num_tokens)
            segments.append(PrefillSegment(token_start, s.num_new_tokens, s.num_computed_tokens,
                                           key_slots))
            token_start += s.num_new_tokens
        return cls(cache, scale, slot_mapping, num_decode, block_tables.to(device),
                   context_lens.to(device), tuple(segments))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        b = self.num_decode_tokens
        if not self.prefill_segments:  # pure decode: the kernel writes the whole output
            return paged_decode_attention(
                q, k_cache, v_cache, self.block_tables, self.context_lens,
                block_size=self.cache.block_size, scale=self.scale, num_splits=self.num_splits)
        out = torch.empty_like(q)
        if b:
            out[:b] = paged_decode_attention(
                q[:b], k_cache, v_cache, self.block_tables, self.context_lens,
                block_size=self.cache.block_size, scale=self.scale, num_splits=self.num_splits)
        for seg in self.prefill_segments:
            rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
            if seg.key_slots is None:
                out[rows] = dense_attention(q[rows], k[rows], v[rows], q_start=0,
                                            scale=self.scale)
            else:
                out[rows] = chunk_attention(q[rows], k_cache[seg.key_slots],
                                            v_cache[seg.key_slots], scale=self.scale)
        return out


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: float) -> torch.Tensor:
    """Causal attention of the last ``Tq`` positions ``q [Tq, Hq, D]`` of a sequence against all
    its keys ``k, v [Tk, Hkv, D]`` (``Tq <= Tk``): query i sees keys ``0 .. Tk - Tq + i``.

    ``causal_lower_right`` runs on the flash backend on CUDA (tiles above the diagonal skipped,
    no mask tensor); on CPU it is materialized, which is the math path's own cost."""
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    bias = causal_lower_right(q.shape[0], k.shape[0])
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
