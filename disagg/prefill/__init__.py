"""The prefill side: TriangleMix prefill of whole prompts, KV published under leases."""
