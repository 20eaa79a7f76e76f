"""The decode side: paged KV pool, continuous batching, local and remote-KV requests."""
