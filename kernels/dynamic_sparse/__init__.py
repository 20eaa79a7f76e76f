"""Dynamic block-sparse prefill attention for the dense layers of TriangleMix.

Per layer: estimate every causal block's attention mass (``selection.block_scores``: the
vertical-slash pattern or antidiagonal sums, ``DynamicSparseParams.method``), keep per KV head
and query block the blocks that carry ``threshold`` of it, or a fixed ``density``
(``selection.select_blocks``), then run causal attention over those blocks only (Triton kernel
on CUDA, the PyTorch reference elsewhere). The diagonal block and the sink block are always
kept.
"""

from __future__ import annotations

import torch

from .params import DynamicSparseParams
from .reference import block_mask, block_sparse_attention_reference
from .selection import (
    antidiagonal_block_scores,
    block_scores,
    blocks_from_mask,
    kept_fraction,
    select_blocks,
    vertical_slash_block_scores,
)

__all__ = [
    "DynamicSparseParams",
    "antidiagonal_block_scores",
    "block_mask",
    "block_scores",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_triton",
    "blocks_from_mask",
    "dynamic_sparse_attention",
    "kept_fraction",
    "select_blocks",
    "vertical_slash_block_scores",
]


def block_sparse_attention_triton(q, k, v, block_idx, block_count, *, block_size: int,
                                  scale: float | None = None) -> torch.Tensor:
    """The Triton kernel; imported lazily (the CPU engine must import without triton)."""
    from .launcher import block_sparse_attention_triton as launch

    return launch(q, k, v, block_idx, block_count, block_size=block_size, scale=scale)


def block_sparse_attention(q, k, v, block_idx, block_count, *, block_size: int,
                           scale: float | None = None) -> torch.Tensor:
    """Causal attention over the listed blocks (see ``reference``): CUDA tensors run the
    Triton kernel, others the PyTorch reference."""
    impl = block_sparse_attention_triton if q.is_cuda else block_sparse_attention_reference
    return impl(q, k, v, block_idx, block_count, block_size=block_size, scale=scale)


def dynamic_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    params: DynamicSparseParams = DynamicSparseParams(),  # noqa: B008 (frozen, immutable)
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select blocks, then attend: q ``[N, Hq, D]``, k/v ``[N, Hkv, D]`` of one whole prompt ->
    ``(out [N, Hq, D], block_count [Hkv, Qb])`` (the counts tell the density kept)."""
    scores = block_scores(q, k, params, scale=scale)
    block_idx, block_count = select_blocks(scores, params)
    out = block_sparse_attention(q, k, v, block_idx, block_count, block_size=params.block_size,
                                 scale=scale)
    return out, block_count
