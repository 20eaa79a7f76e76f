"""The KV layout both sides agree on, the packed form KV travels in, and its fingerprint.

Layout: per layer, K and V are each one contiguous tensor of token rows ``[rows, Hkv, D]``.
The decode pool is that tensor for ``num_blocks * block_size`` rows, allocated in block
*ranges*; a request's KV is a few contiguous row ranges per layer, so it moves in a few large
copies, never block by block. The packed form of one request's prompt KV is the same thing
with exactly its rows: ``PackedKV.k[layer]`` is ``[N, Hkv, D]``.

Every KV cache is tagged with the fingerprint of what produced it. Deep-layer K/V of a
TriangleMix prefill differ from a dense prefill's, and a cache built for another model, dtype
or prompt must never be attended over: decode checks the fingerprint before accepting KV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

LAYOUT_VERSION = "layer-contiguous-v1"


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model's KV rows."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def row_shape(self) -> tuple[int, int]:
        return (self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def tag(self) -> str:
        """The layout as the fingerprint names it (dtype is a field of its own)."""
        return f"{LAYOUT_VERSION}:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_dim}"

    @classmethod
    def of_model(cls, model, dtype: torch.dtype | None = None) -> KVLayout:
        c = model.config
        dtype = dtype or next(model.parameters()).dtype
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, dtype)


@dataclass(frozen=True)
class KVFingerprint:
    """What produced a KV cache; decode accepts KV only when this matches its expectation."""

    model: str  # served model name
    dtype: str  # e.g. "torch.float32"
    layout: str  # KVLayout.tag
    attention: str  # AttentionConfig tag of the prefill, e.g. "dense" or "trianglemix(...)"
    num_prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KVFingerprint:
        return cls(**{k: d[k] for k in ("model", "dtype", "layout", "attention",
                                         "num_prompt_tokens")})

    def mismatches(self, expected: KVFingerprint, *, check_attention: bool = False) -> list[str]:
        """Names and values of fields that differ (attention only when asked: decode attends
        densely over KV of any prefill attention, but records which one made it)."""
        fields = ["model", "dtype", "layout", "num_prompt_tokens"]
        if check_attention:
            fields.append("attention")
        return [f"{f}: got {getattr(self, f)!r}, expected {getattr(expected, f)!r}"
                for f in fields if getattr(self, f) != getattr(expected, f)]


@dataclass
class PackedKV:
    """One request's prompt KV: per layer ``k[l]``, ``v[l]`` of ``[N, Hkv, D]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[0]

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep one layer's K/V (the prefill's sink for local use)."""
        self.k[layer].copy_(k)
        self.v[layer].copy_(v)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @classmethod
    def empty(cls, layout: KVLayout, num_tokens: int, device: torch.device | str) -> PackedKV:
        shape = (num_tokens, *layout.row_shape)
        return cls(
            k=[torch.empty(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)],
            v=[torch.empty(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)],
        )
