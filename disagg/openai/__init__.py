"""The OpenAI-compatible API: request/response models and the one error mapping."""
