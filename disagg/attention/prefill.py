"""Attention metadata of one prefill forward: writes the prompt's KV in packed form and runs
each layer's attention kind (dense, or Triangle for TriangleMix's deep layers).

The prompt's K/V are written straight into the ``PackedKV`` buffers (which may be views into
a larger cache), so the KV the prefill produces is already in the form it is shipped in.
Query rows ``q_start ..`` of a prompt of ``num_prompt_tokens`` tokens: the whole prompt today;
a sequence-parallel shard later, with the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from disagg_kernels.triangle_mix import triangle_attention

from disagg.attention.dense import dense_attention
from disagg.attention.metadata import AttentionKind
from disagg.attention.triangle import TriangleMixConfig
from disagg.kv.layout import PackedKV


@dataclass(frozen=True)
class PrefillAttention:
    """Metadata of a forward over all ``num_prompt_tokens`` tokens of one prompt."""

    kv: PackedKV
    scale: float
    trianglemix: TriangleMixConfig | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return self.kv.num_tokens

    def kind(self, layer_idx: int) -> AttentionKind:
        if self.trianglemix is None:
            return AttentionKind.DENSE
        return self.trianglemix.kind(layer_idx, self.num_prompt_tokens)

    def attend(self, layer_idx: int, q, k, v) -> torch.Tensor:
        if q.shape[0] != self.num_prompt_tokens:
            raise ValueError(f"prefill of {q.shape[0]} rows, KV buffers of {self.num_prompt_tokens}")
        self.kv.k[layer_idx].copy_(k)
        self.kv.v[layer_idx].copy_(v)
        if self.kind(layer_idx) is AttentionKind.TRIANGLE:
            out, _ = triangle_attention(q, k, v, num_tokens=self.num_prompt_tokens,
                                        params=self.trianglemix.params, scale=self.scale)
            return out
        return dense_attention(q, k, v, q_start=0, scale=self.scale)
