"""Teacher-forced scoring of continuations after a (sparse) prefill, batched.

What a user gets from a prompt is the prefill (dense, TriangleMix, dynamic) followed by dense
decode over the KV it produced. Greedy decoding emits a reference answer exactly iff, fed the
answer's own tokens, the model's argmax at every answer position is the next answer token; so
one forward over ``prompt + answer`` scores it, if each layer attends as serving would:
- the ``N`` prompt rows as the prefill does: the layer's kind from the attention config at
  prompt length ``N`` (Triangle rows of the prompt see only their sinks and window, their last
  ``n_last`` rows are dense; dynamic layers keep their selected blocks);
- the continuation rows densely over every earlier key, as decode does.
``ContinuationAttention`` is that metadata for ``B`` sequences of one prompt length and one
continuation length, flattened ``[B * (N + A)]`` (the matrix products run on the whole batch;
attention runs per sequence through the engine's own kernels; on CUDA the dense squares of the
batch run as one SDPA call). ``score_configs`` scores several configurations of the same
samples and computes their common dense prefix (the layers before a configuration's first
Triangle layer) once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from disagg_kernels.dynamic_sparse import dynamic_sparse_attention
from disagg_kernels.triangle_mix import triangle_attention

from disagg.attention.dense import dense_attention
from disagg.attention.metadata import AttentionKind
from disagg.attention.paged import chunk_attention
from disagg.attention.triangle import TriangleMixConfig
from disagg.models.llama import LlamaForCausalLM
from disagg.models.rope import rope_cos_sin


@dataclass(frozen=True)
class ContinuationAttention:
    """Metadata of one forward over ``num_sequences`` x (``num_prompt_tokens`` prompt +
    ``num_continuation_tokens`` continuation) tokens; ``trianglemix`` None is dense."""

    num_sequences: int
    num_prompt_tokens: int
    num_continuation_tokens: int
    scale: float
    trianglemix: TriangleMixConfig | None = None

    def kind(self, layer_idx: int) -> AttentionKind:
        if self.trianglemix is None:
            return AttentionKind.DENSE
        return self.trianglemix.kind(layer_idx, self.num_prompt_tokens)

    def attend(self, layer_idx: int, q, k, v) -> torch.Tensor:
        n, total = self.num_prompt_tokens, self.num_prompt_tokens + self.num_continuation_tokens
        kind = self.kind(layer_idx)
        if kind is AttentionKind.DENSE and q.is_cuda:  # every sequence's causal square at once
            return _batched_causal(q, k, v, self.num_sequences, self.scale)
        out = torch.empty_like(q)
        for b in range(self.num_sequences):
            rows = slice(b * total, (b + 1) * total)
            qb, kb, vb = q[rows], k[rows], v[rows]
            if kind is AttentionKind.DENSE:  # prompt and continuation: one causal square
                out[rows] = dense_attention(qb, kb, vb, q_start=0, scale=self.scale)
                continue
            prompt = slice(b * total, b * total + n)
            if kind is AttentionKind.TRIANGLE:
                out[prompt], _ = triangle_attention(qb[:n], kb[:n], vb[:n], num_tokens=n,
                                                    params=self.trianglemix.params,
                                                    scale=self.scale)
            else:
                out[prompt], _ = dynamic_sparse_attention(qb[:n], kb[:n], vb[:n],
                                                          params=self.trianglemix.dynamic,
                                                          scale=self.scale)
            out[b * total + n:(b + 1) * total] = chunk_attention(qb[n:], kb, vb, scale=self.scale)
        return out


def _batched_causal(q, k, v, num_sequences: int, scale: float) -> torch.Tensor:
    """``B`` causal squares of one length in one SDPA call (on cuDNN, as the prefill's dense
    squares run without FlashAttention-4), ``[B * T, H, D]`` in and out."""
    from disagg.attention.dense_backends import sdpa_cudnn

    qh, kh, vh = (x.view(num_sequences, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = sdpa_cudnn(qh, kh, vh, scale)
    return out.transpose(1, 2).reshape(q.shape)


@dataclass(frozen=True)
class ContinuationScores:
    """Per sequence: every continuation token the greedy argmax (``exact``), and the summed
    negative log-likelihood of the continuation (nats) over ``num_tokens`` tokens."""

    exact: list[bool]
    nll: list[float]
    num_tokens: list[int]


def score_continuations(model: LlamaForCausalLM, prompts: torch.Tensor,
                        continuations: list[list[int]],
                        trianglemix: TriangleMixConfig | None) -> ContinuationScores:
    """Score ``continuations`` (token ids, ragged) after ``prompts [B, N]`` (one length).

    Continuations are right-padded to the longest (padding comes after every scored position,
    so causality keeps it out of the scores)."""
    return score_configs(model, prompts, continuations, {"only": trianglemix})["only"]


@torch.inference_mode()
def score_configs(model: LlamaForCausalLM, prompts: torch.Tensor,
                  continuations: list[list[int]],
                  configs: dict[str, TriangleMixConfig | None]) -> dict[str, ContinuationScores]:
    """``score_continuations`` of the same samples under several configurations, sharing the
    dense prefix: every layer before a configuration's first non-dense layer computes exactly
    what the dense forward computes, so one dense pass runs as deep as any configuration needs
    and each configuration continues from a copy of the hidden state where it departs."""
    device = next(model.parameters()).device
    num_seq, n = prompts.shape
    width = max(len(c) for c in continuations)
    cont = torch.zeros(num_seq, width, dtype=torch.long)
    for i, c in enumerate(continuations):
        cont[i, :len(c)] = torch.tensor(c)
    tokens = torch.cat([prompts.cpu(), cont], dim=1).to(device)  # [B, N + A]
    total = n + width
    positions = torch.arange(total, device=device).repeat(num_seq)
    layers = model.model.layers
    meta = {name: ContinuationAttention(num_seq, n, width, model.scale, c)
            for name, c in configs.items()}
    depart = {name: next((i for i in range(len(layers))
                          if m.kind(i) is not AttentionKind.DENSE), len(layers))
              for name, m in meta.items()}
    dense = ContinuationAttention(num_seq, n, width, model.scale, None)
    x = model.model.embed_tokens(tokens.reshape(-1))
    cos, sin = rope_cos_sin(model._inverse_frequencies(device), positions)
    residual, start = None, {}
    for i in range(max(depart.values()) + 1):
        for name in [k for k, d in depart.items() if d == i]:
            start[name] = (x.clone(), None if residual is None else residual.clone())
        if i == len(layers) or i == max(depart.values()):
            break
        x, residual = layers[i](x, residual, cos, sin, dense)
    target = cont.to(device)
    lengths = [len(c) for c in continuations]
    valid = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    out = {}
    for name, (x, residual) in start.items():
        for i in range(depart[name], len(layers)):
            x, residual = layers[i](x, residual, cos, sin, meta[name])
        hidden = model.model.norm(x) if residual is None else model.model.norm(x, residual)[0]
        hidden = hidden.view(num_seq, total, -1)
        logits = model.compute_logits(hidden[:, n - 1:n - 1 + width].reshape(num_seq * width, -1))
        logp = torch.log_softmax(logits.view(num_seq, width, -1), dim=-1)
        token_nll = -logp.gather(-1, target[..., None])[..., 0]
        exact = ((logp.argmax(-1) == target) | ~valid).all(-1)
        nll = (token_nll * valid).sum(-1)
        out[name] = ContinuationScores(exact.tolist(), nll.tolist(), lengths)
        del logits, logp
    return out
