"""The prefill side: TriangleMix prefill of whole prompts, each layer's KV handed to a writer."""
