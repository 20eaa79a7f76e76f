"""The decoding-time contribution probe: which layers can run Triangle attention.

Per layer ``l`` the probe puts a gate ``g_l`` (1.0) on the attention contribution of the region
Triangle attention skips (the "middle": pairs that are causal but neither sink, window nor
last row), keeping the dense softmax: ``out = P_kept V + g_l P_middle V``. On key-value
retrieval prompts it takes the loss of the first generated token (the answer's first token)
and its gradient with respect to every gate; ``|dL/dg_l|``, averaged over prompts, is the
first-order sensitivity of the answer to dropping that layer's middle. The layers with the
smallest scores are the recommended Triangle layers.

Gradients need autograd through the whole model, which our engine's fused in-place kernels do
not support, so the probe runs transformers' implementation of the same weights with an
attention function of its own (``_gated_attention``; registered once under ``PROBE_ATTENTION``
and given its state through the forward call's kwargs, never through globals).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from disagg_kernels.triangle_mix import TriangleParams, triangle_keep

from disagg.fidelity.tasks import generate_task
from disagg.models.loader import ModelSource, load_model

PROBE_ATTENTION = "disagg_probe"


@dataclass(frozen=True)
class ProbeResult:
    """Per-layer scores and the recommended Triangle layers."""

    model: str
    num_prompts: int
    prompt_tokens: int
    params: TriangleParams
    scores: tuple[float, ...]  # mean |dL/dg_l| per layer
    signed: tuple[float, ...]  # mean -dL/dg_l: first-order loss increase of dropping the middle
    mean_loss: float

    def recommend(self, num_triangle_layers: int) -> tuple[int, ...]:
        """The ``num_triangle_layers`` layers of lowest score, ascending."""
        if not 1 <= num_triangle_layers <= len(self.scores):
            raise ValueError(f"num_triangle_layers must be in 1..{len(self.scores)}")
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))
        return tuple(sorted(order[:num_triangle_layers]))

    def to_dict(self, num_triangle_layers: int) -> dict:
        return {
            "model": self.model, "num_prompts": self.num_prompts,
            "prompt_tokens": self.prompt_tokens,
            "params": {"n_sink": self.params.n_sink, "n_window": self.params.n_window,
                       "n_last": self.params.n_last},
            "scores": list(self.scores), "signed": list(self.signed),
            "mean_loss": self.mean_loss, "num_triangle_layers": num_triangle_layers,
            "recommended": list(self.recommend(num_triangle_layers)),
        }


@dataclass
class _ProbeState:
    gates: torch.Tensor  # [num_layers], requires grad
    middle: torch.Tensor  # [N, N] bool


def _gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     probe: _ProbeState | None = None, **kwargs):
    """transformers attention interface: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` ->
    (``[B, T, Hq, D]``, None); causal, dense softmax, middle contribution scaled by its gate."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    n = query.shape[2]
    s = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    p = torch.softmax(s.masked_fill(~causal, -float("inf")), dim=-1)
    gate = torch.where(probe.middle, probe.gates[module.layer_idx], 1.0)
    out = torch.matmul(p * gate, v)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_ATTENTION, _gated_attention)


def build_probe_model(source: ModelSource, device: str | torch.device):
    """transformers' model of ``source`` (fp32, our weights) with the probe's attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _register()
    ours = load_model(source, device="cpu")
    config = AutoConfig.for_model(**source.hf_config())
    config._attn_implementation = PROBE_ATTENTION
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = ours.state_dict()
    if ours.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf.load_state_dict(state, assign=True, strict=False)
    if ours.config.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)  # a meta buffer otherwise
    return hf.to(device).eval().requires_grad_(False)


def token_kv_prompts(vocab_size: int, num_tokens: int, num_prompts: int, seed: int
                     ) -> list[tuple[list[int], int]]:
    """Key-value retrieval in token ids, for models without a tokenizer: pairs ``k v`` of
    random tokens, then a queried key; the answer is its value. ``(prompt ids, answer id)``."""
    prompts = []
    for i in range(num_prompts):
        rng = random.Random(f"probe/{seed}/{i}")
        pairs = [(rng.randrange(4, vocab_size), rng.randrange(4, vocab_size))
                 for _ in range(num_tokens // 2 + 1)]
        target = rng.randrange(len(pairs) // 4)  # early: its value sits in the middle region
        ids = [t for pair in pairs for t in pair][: num_tokens - 1] + [pairs[target][0]]
        prompts.append((ids, pairs[target][1]))
    return prompts


def retrieval_prompts(source: ModelSource, num_tokens: int, num_prompts: int, seed: int
                      ) -> list[tuple[list[int], int]]:
    """Text key-value retrieval prompts (UUID keys) when the model has a tokenizer."""
    if not source.has_tokenizer:
        return token_kv_prompts(source.model_config().vocab_size, num_tokens, num_prompts, seed)
    from disagg.models.loader import load_tokenizer

    samples = generate_task(load_tokenizer(source), "kv_retrieval", num_tokens, num_prompts,
                            seed=seed)
    return [(s.prompt_ids, s.answer_ids[0]) for s in samples]


def probe_layers(hf_model, prompts: list[tuple[list[int], int]], params: TriangleParams,
                 model_name: str = "", progress: bool = False) -> ProbeResult:
    """Mean ``|dL/dg_l|`` per layer over ``prompts`` (see the module docstring); ``progress``
    draws a bar on stderr."""
    from tqdm import tqdm

    device = next(hf_model.parameters()).device
    num_layers = hf_model.config.num_hidden_layers
    total_abs = torch.zeros(num_layers, dtype=torch.float64)
    total = torch.zeros(num_layers, dtype=torch.float64)
    losses = []
    for ids, answer in tqdm(prompts, desc="probe", disable=not progress):
        n = len(ids)
        pos = torch.arange(n, device=device)
        keep = triangle_keep(pos[:, None], pos[None, :], n, params)
        middle = (pos[None, :] <= pos[:, None]) & ~keep
        state = _ProbeState(torch.ones(num_layers, device=device, requires_grad=True), middle)
        with torch.enable_grad():
            logits = hf_model(input_ids=torch.tensor([ids], device=device), probe=state,
                              logits_to_keep=1, use_cache=False).logits[0, -1].float()
            loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([answer],
                                                                                device=device))
            (grad,) = torch.autograd.grad(loss, state.gates)
        total_abs += grad.abs().double().cpu()
        total -= grad.double().cpu()
        losses.append(float(loss.detach()))
    count = max(len(prompts), 1)
    return ProbeResult(model_name, len(prompts), len(prompts[0][0]) if prompts else 0, params,
                       tuple((total_abs / count).tolist()), tuple((total / count).tolist()),
                       sum(losses) / count)
