"""A compact Llama-family decoder (Llama 3.x, SmolLM2, Qwen2, Mistral).

Tokens of one forward call are flattened to ``[T]`` (one sequence or many, vLLM-style) with
their absolute ``positions``; attention is delegated to the ``AttentionMetadata`` passed down
the call, which owns the KV cache and the per-layer attention kind. Parameter names match the
Hugging Face checkpoints, so a safetensors state dict loads as it is. The model is
single-device; parallelism is applied around it, never inside.

Elementwise work goes through the fused ops of ``disagg_kernels.fused`` (Triton on CUDA, their
PyTorch references elsewhere): residual add + RMSNorm in one pass (vLLM's layout: each layer
takes and returns ``(hidden, residual)``), RoPE in place from one fp32 cos/sin table per
forward, SiLU x mul written over the gate. Matrix products stay on cuBLAS.
"""

from __future__ import annotations

import torch
from disagg_kernels import fused
from torch import nn

from disagg.attention.metadata import AttentionMetadata
from disagg.models.config import ModelConfig
from disagg.models.rope import apply_rope, inverse_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``residual += x`` in place, then
        ``(norm(residual), residual)``. Normalised in fp32 whatever the dtypes; the output is
        in the weights' dtype, ready for the next matrix product."""
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, q_size = config.hidden_size, config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=config.o_bias)

    def forward(self, x, cos, sin, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        apply_rope(q, k, cos, sin)
        out = metadata.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        # Written over the gate: at 128K tokens of an 8B model each [T, I] tensor is 3.8 GB.
        return self.down_proj(fused.silu_mul(gate, self.up_proj(x), out=gate))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, metadata: AttentionMetadata):
        """``x``: the previous layer's MLP output (the embeddings for layer 0, with ``residual``
        None). Returns this layer's MLP output and the residual stream before it is added."""
        if residual is None:
            residual = x.to(torch.float32, copy=True)
            h = self.input_layernorm(residual)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, metadata)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; ``forward`` returns hidden states, ``compute_logits`` the logits.

    Logits are computed only for the rows asked for (a prefill needs one row, not N x vocab).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Kept out of the module's buffers so that casting the model to bf16 never rounds it.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @property
    def scale(self) -> float:
        return self.config.head_dim**-0.5

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """``input_ids``, ``positions`` ``[T]`` -> final hidden states ``[T, hidden]`` (in the
        weights' dtype)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self._inverse_frequencies(x.device), positions)
        # The residual stream stays in fp32 whatever the weights' dtype: in bf16 its rounding
        # compounds over depth (measured on the H200: 30 bf16 layers drift past 1e-2 relative
        # RMS of the fp32 KV by layer 11). The fused add + norm reads and writes it once per
        # sublayer, so fp32 costs 4 more bytes per element than bf16 there, nothing else.
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, metadata)
        if residual is None:  # a model without layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def _inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            inv_freq = inverse_frequencies(self.config.rope, self.config.head_dim)
            self._inv_freq[device] = inv_freq.to(device)
        return self._inv_freq[device]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden]`` -> fp32 logits ``[R, vocab]``."""
        return self.lm_head(hidden).float()
