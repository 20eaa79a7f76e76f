"""The attention-metadata contract between the model and whoever owns the KV cache.

The model is single-device and cache-agnostic: each layer computes q, k, v (RoPE applied) for
the flattened tokens of one forward call and hands them to ``metadata.attend``. The metadata
object, built fresh for every forward by its owner (the generator, the prefill engine, the
decode runner), knows where those tokens sit in their sequences, stores their K/V wherever its
cache lives, and picks the attention kind of each layer. Nothing about a call is global.
"""

from __future__ import annotations

import enum
from typing import Protocol

import torch


class AttentionKind(enum.Enum):
    """How one layer attends during prefill (decode is always dense)."""

    DENSE = "dense"
    TRIANGLE = "triangle"
    DYNAMIC = "dynamic"  # a dense layer run block-sparse (TriangleMixConfig.dynamic)


class AttentionMetadata(Protocol):
    """Per-forward attention state, passed down the model's forward call."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store k, v ``[T, Hkv, D]`` of this call's tokens and return attention ``[T, Hq, D]``."""
        ...
