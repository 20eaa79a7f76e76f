"""Attention metadata of one prefill forward: hands each layer's K/V to a sink and runs each
layer's attention kind (dense, or Triangle for TriangleMix's deep layers, or dynamic
block-sparse for its other layers when the config asks for it).

The sink takes a layer's K/V the moment they are computed: a ``PackedKV`` keeps them (local
use), a KV writer of the hand-off moves them to decode's reserved rows while the next layers
run. Between layers the forward checks ``cancelled``: a request cancelled mid-prefill stops
at the next layer boundary (``PrefillCancelled``), and no later layer is written anywhere.
Query rows ``q_start ..`` of a prompt of ``num_prompt_tokens`` tokens: the whole prompt today;
a sequence-parallel shard later, with the same contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from disagg_kernels.dynamic_sparse import dynamic_sparse_attention
from disagg_kernels.triangle_mix import triangle_attention

from disagg.attention.dense import dense_attention
from disagg.attention.metadata import AttentionKind
from disagg.attention.triangle import TriangleMixConfig
from disagg.errors import DisaggError


class PrefillCancelled(DisaggError):
    """The request was cancelled while its prefill ran; it stopped at a layer boundary."""


class KVSink(Protocol):
    """Takes one layer's K/V ``[N, Hkv, D]`` as soon as it is computed."""

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class PrefillAttention:
    """Metadata of a forward over all ``num_prompt_tokens`` tokens of one prompt."""

    sink: KVSink
    num_prompt_tokens: int
    scale: float
    trianglemix: TriangleMixConfig | None = None
    cancelled: Callable[[], bool] | None = None

    def kind(self, layer_idx: int) -> AttentionKind:
        if self.trianglemix is None:
            return AttentionKind.DENSE
        return self.trianglemix.kind(layer_idx, self.num_prompt_tokens)

    def attend(self, layer_idx: int, q, k, v) -> torch.Tensor:
        if q.shape[0] != self.num_prompt_tokens:
            raise ValueError(f"prefill of {q.shape[0]} rows, KV buffers of {self.num_prompt_tokens}")
        if self.cancelled is not None and self.cancelled():
            raise PrefillCancelled(f"prefill cancelled before layer {layer_idx}")
        self.sink.write_layer(layer_idx, k, v)
        kind = self.kind(layer_idx)
        if kind is AttentionKind.TRIANGLE:
            out, _ = triangle_attention(q, k, v, num_tokens=self.num_prompt_tokens,
                                        params=self.trianglemix.params, scale=self.scale)
            return out
        if kind is AttentionKind.DYNAMIC:
            out, _ = dynamic_sparse_attention(q, k, v, params=self.trianglemix.dynamic,
                                              scale=self.scale)
            return out
        return dense_attention(q, k, v, q_start=0, scale=self.scale)
