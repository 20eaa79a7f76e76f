"""Configuration of the decode engine (frozen, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.kv.layout import KVLayout

DEFAULT_NUM_BLOCKS = 1024


@dataclass(frozen=True)
class DecodeConfig:
    """How the decode engine sizes its KV pool and batches."""

    block_size: int = 16
    """Token rows per KV block."""
    num_blocks: int | None = None
    """KV blocks in the pool; None: from ``kv_cache_bytes``, else 1024."""
    kv_cache_bytes: int | None = None
    """KV pool budget in bytes (K and V, all layers); used when ``num_blocks`` is None."""
    max_num_seqs: int = 64
    """Most sequences running (one row each in every decode forward)."""
    max_num_batched_tokens: int = 2048
    """Most tokens in one forward; longer local prefills are chunked to fit."""
    remote_kv_timeout_s: float = 300.0
    """Deadline of a remote request, from ``add_remote_request`` until its KV is usable (its
    KV destination expires with it: no prefill writes there afterwards)."""
    eos_token_ids: tuple[int, ...] | None = None
    """End-of-sequence ids; None: the model config's."""
    async_scheduling: bool | None = None
    """Queue each decode step's forward before reading the previous one's tokens, so the host's
    work of a step overlaps the device's (vLLM's async scheduling); None: on CUDA only (on the
    CPU the forward itself runs on the host, so nothing overlaps)."""

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.num_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("set num_blocks or kv_cache_bytes, not both")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running sequence gets its decode row in every forward.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.remote_kv_timeout_s <= 0:
            raise ValueError("remote_kv_timeout_s must be positive")

    def resolve_num_blocks(self, layout: KVLayout) -> int:
        """Blocks of the pool for a model of this KV layout."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_bytes is None:
            return DEFAULT_NUM_BLOCKS
        num_blocks = self.kv_cache_bytes // (layout.bytes_per_token * self.block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes} holds no block of {self.block_size} "
                f"tokens at {layout.bytes_per_token} bytes per token")
        return num_blocks
