"""Attention metadata of one decode-engine forward over the paged KV cache.

One forward serves a mixed batch: decode rows (one new token each, of many sequences) first,
then local-prefill segments (a prompt, a chunk of one, or a preempted sequence being
recomputed). For every layer, ``attend``:
1. stores the call's new K/V at ``slot_mapping`` (their cache rows);
2. decode rows: one SDPA call for all of them over a padded gather of each sequence's keys
   ``[B, Lmax]`` with a key mask (native GQA, K/V never repeated to the query heads);
3. prefill segments: dense causal attention (``dense.py``) over the segment's keys -- the
   call's own K/V for a fresh prompt, rows gathered from the cache for a later chunk.
Decode is always dense, whatever attention the prefill that produced the KV used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """Per-forward metadata; build it with ``PagedAttention.build``."""

    cache: PagedKVCache
    scale: float
    slot_mapping: torch.Tensor  # [T] cache row of each new token
    num_decode_tokens: int  # the first B rows of the call are decode rows
    decode_key_slots: torch.Tensor  # [B, Lmax] cache rows of each decode row's keys (padded)
    decode_key_mask: torch.Tensor  # [B, 1, 1, Lmax] True where the key exists
    prefill_segments: tuple[PrefillSegment, ...]

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
        all_slots = [cache.slot_mapping(s.block_table, 0, s.num_tokens) for s in sequences]
        slot_mapping = torch.cat([slots[s.num_computed_tokens:]
                                  for s, slots in zip(sequences, all_slots)]) if sequences \
            else torch.empty(0, dtype=torch.long, device=device)
        decode_slots = all_slots[:num_decode]
        max_len = max((len(x) for x in decode_slots), default=0)
        key_slots = torch.zeros(num_decode, max_len, dtype=torch.long, device=device)
        key_mask = torch.zeros(num_decode, 1, 1, max_len, dtype=torch.bool, device=device)
        for b, slots in enumerate(decode_slots):
            key_slots[b, :len(slots)] = slots
            key_mask[b, ..., :len(slots)] = True
        segments, token_start = [], num_decode
        for s, slots in zip(sequences[num_decode:], all_slots[num_decode:]):
            fresh = s.num_computed_tokens == 0
            segments.append(PrefillSegment(token_start, s.num_new_tokens, s.num_computed_tokens,
                                           None if fresh else slots))
            token_start += s.num_new_tokens
        return cls(cache, scale, slot_mapping, num_decode, key_slots, key_mask, tuple(segments))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        out = torch.empty_like(q)
        b = self.num_decode_tokens
        if b:
            # [B, Lmax, Hkv, D] -> [B, Hkv, Lmax, D]; queries [B, Hq, 1, D].
            keys = k_cache[self.decode_key_slots].transpose(1, 2)
            values = v_cache[self.decode_key_slots].transpose(1, 2)
            out[:b] = F.scaled_dot_product_attention(
                q[:b].unsqueeze(2), keys, values, attn_mask=self.decode_key_mask,
                scale=self.scale, enable_gqa=True,
            ).squeeze(2)
        for seg in self.prefill_segments:
            rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
            if seg.key_slots is None:
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_cache[seg.key_slots], v_cache[seg.key_slots]
            out[rows] = dense_attention(q[rows], keys, values, q_start=seg.q_start, k_start=0,
                                        scale=self.scale)
        return out
