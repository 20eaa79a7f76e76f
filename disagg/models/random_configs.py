"""Named architectures for random-weight models (``random:<name>``).

Random weights are for tests of machinery (routing, faults, sequence parallelism, soak) and
for GPU benchmarks of real shapes. They have no tokenizer: they take token-id prompts only.
Each entry is a Hugging Face ``config.json`` dict, so transformers can load the same weights.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_theta": 1000000.0, "use_sliding_window": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "tiny-mistral": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 32, "max_position_embeddings": 4096, "sliding_window": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "smollm2-135m": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_theta": 100000.0, "bos_token_id": 1, "eos_token_id": 2,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": [151645, 151643],
    },
}
