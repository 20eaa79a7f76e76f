"""A contiguous per-sequence KV cache, for the single-request generator.

Life of a sequence in it:
1. ``ContiguousKVCache.allocate`` reserves ``[max_tokens, Hkv, D]`` per layer for K and V.
2. Prefill: ``PrefillAttention`` writes the prompt's K/V into views of rows 0..N-1 (its
   layers may be TriangleMix); ``ContiguousAttention(start=0)`` would do it densely.
3. Each decode step: ``ContiguousAttention(cache, start=n, ...)`` writes one row at n and
   attends over 0..n.
The paged pool of the decode engine replaces this for batched serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.attention.dense import dense_attention


@dataclass
class ContiguousKVCache:
    """K and V of one sequence, one tensor per layer: ``[max_tokens, Hkv, D]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, *, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> ContiguousKVCache:
        shape = (max_tokens, num_kv_heads, head_dim)
        return cls(
            k=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_tokens(self) -> int:
        return self.k[0].shape[0]


@dataclass(frozen=True)
class ContiguousAttention:
    """Metadata of one forward of one sequence whose first ``start`` tokens are cached."""

    cache: ContiguousKVCache
    start: int
    scale: float

    def attend(self, layer_idx: int, q, k, v):
        end = self.start + q.shape[0]
        if end > self.cache.max_tokens:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.cache.max_tokens}")
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache[self.start:end] = k
        v_cache[self.start:end] = v
        return dense_attention(
            q, k_cache[:end], v_cache[:end], q_start=self.start, k_start=0, scale=self.scale
        )
