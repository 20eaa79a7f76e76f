"""Sampling parameters and the keyed sampler.

The random draw for the k-th generated token of a request is a pure function of
(request seed, k): it does not depend on which worker samples it, what else is in the batch,
or how many draws came before. So the prefill worker (which samples token 0) and the decode
worker (tokens 1..) of the disaggregated path produce the same tokens as the local path.
A request without a seed is given a random one when it is created.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from disagg.errors import InvalidRequestError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how to pick each token (OpenAI/vLLM semantics)."""

    max_tokens: int | None = None  # None: whatever the context leaves after the prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, excluded from the output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the sampled token's plus top n

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0 (0 disables it)", param="top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs must be between 0 and 20", param="logprobs")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", param="stop")


@dataclass(frozen=True)
class RequestSeed:
    """The seed a request samples with: the user's, or one drawn at creation."""

    value: int = field(default_factory=lambda: random.getrandbits(63))

    @classmethod
    def of(cls, params: SamplingParams) -> RequestSeed:
        return cls() if params.seed is None else cls(params.seed)


def keyed_uniform(seed: int, step: int) -> float:
    """A uniform draw in [0, 1) determined by (seed, step) alone (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """Pick the next token from fp32 ``logits [V]`` for generated-token index ``step``."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs, ids = torch.sort(torch.softmax(logits / params.temperature, dim=-1),
                            descending=True, stable=True)
    if params.top_k:
        probs, ids = probs[: params.top_k], ids[: params.top_k]
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = torch.cumsum(probs, dim=0) - probs
        keep = int((before < params.top_p).sum())
        probs, ids = probs[:keep], ids[:keep]
    cdf = torch.cumsum(probs.double(), dim=0)
    target = keyed_uniform(seed, step) * float(cdf[-1])
    index = min(int(torch.searchsorted(cdf, target, right=True)), len(ids) - 1)
    return int(ids[index])


@dataclass(frozen=True)
class SampledToken:
    """A generated token with its log-probability and the top alternatives, when asked for.

    Log-probabilities are of the model's raw distribution (log-softmax of the logits, before
    temperature and filtering), as vLLM and OpenAI report them.
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> SampledToken:
    """``sample_token`` plus the log-probabilities ``params.logprobs`` asks for."""
    token_id = sample_token(logits, params, seed, step)
    if params.logprobs is None:
        return SampledToken(token_id)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(params.logprobs) if params.logprobs else None
    alternatives = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist()))
    return SampledToken(token_id, float(logprobs[token_id]), alternatives)
