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

``fuse_projections`` (run by ``load_model`` once the weights are in place) packs each layer's
q/k/v weights into one ``[q + 2 kv, hidden]`` matrix and gate/up into one ``[2 I, hidden]``
(vLLM's ``qkv_proj`` / ``gate_up_proj``): one matrix product instead of three (two), and RoPE
of q and k in one launch, since their heads sit side by side in the product's rows. The
Hugging Face parameters stay, as views of the packed matrix, so state dicts keep their names and
loading into them writes the packed matrix. Moving or casting the model afterwards gives the
parameters storage of their own; a layer then sees its pack is stale and runs unfused (same
results) until ``fuse_projections`` runs again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class _Pack:
    """The packed weight (and bias) of some linears, and the parameters it was made for."""

    def __init__(self, *linears: nn.Linear):
        self.weight, self.bias = _pack_rows(*linears)
        self._linears = linears
        self._addresses = self._current_addresses()

    def _current_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for m in self._linears for p in m.parameters())

    def is_current(self) -> bool:
        """Whether every parameter still lives where the pack put it (not replaced, moved or
        cast since: each of those gives a parameter storage of its own)."""
        return self._current_addresses() == self._addresses


def _pack_rows(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along the output rows and re-point
    every parameter at its rows of the result; returns (weight, bias or None)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


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
        self._qkv: _Pack | None = None

    def fuse(self) -> None:
        self._qkv = _Pack(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens, h, kv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self._qkv is not None and self._qkv.is_current():
            qkv = F.linear(x, self._qkv.weight, self._qkv.bias).view(num_tokens, h + 2 * kv, d)
            fused.rope(qkv[:, :h + kv], cos, sin)  # q and k heads side by side: one launch
            q, k, v = qkv[:, :h], qkv[:, h:h + kv], qkv[:, h + kv:]
        else:
            q = self.q_proj(x).view(num_tokens, h, d)
            k = self.k_proj(x).view(num_tokens, kv, d)
            v = self.v_proj(x).view(num_tokens, kv, d)
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
        self._gate_up: _Pack | None = None

    def fuse(self) -> None:
        self._gate_up = _Pack(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and self._gate_up.is_current():
            gate_up = F.linear(x, self._gate_up.weight, self._gate_up.bias)
            gate, up = gate_up.chunk(2, dim=-1)
            # Written over the gate half: the down projection reads it with a row stride of 2I.
            return self.down_proj(fused.silu_mul(gate, up, out=gate))
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

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Pack every layer's q/k/v and gate/up weights (see the module doc); run after the
        weights are loaded and placed."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

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
