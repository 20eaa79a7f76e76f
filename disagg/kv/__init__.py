"""KV cache: the layout both sides share, the decode block pool, and the paged cache."""
