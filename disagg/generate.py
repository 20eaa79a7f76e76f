"""Single-request generation with a contiguous KV cache (the ``generate`` CLI's engine).

Life of a request here:
1. ``generate`` validates the prompt and resolves max_tokens (length rule).
2. Prefill: one forward over the prompt fills the cache (dense, or TriangleMix when
   configured); the last row's logits give token 0.
3. Decode: one forward per token at position N + k, until EOS, a stop id or max_tokens.
The batched, paged decode engine serves many requests; this one keeps the CLI simple.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.attention.prefill import PrefillAttention
from disagg.attention.triangle import TriangleMixConfig
from disagg.kv.layout import PackedKV
from disagg.models.llama import LlamaForCausalLM
from disagg.request import resolve_max_tokens, validate_prompt
from disagg.sampling import RequestSeed, SamplingParams, sample_token


@dataclass
class GenerationStats:
    """Wall-clock split of one generation (seconds)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    step_times_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.num_generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class SimpleGenerator:
    """Generates for one request at a time on one device."""

    def __init__(self, model: LlamaForCausalLM, trianglemix: TriangleMixConfig | None = None):
        self.model = model
        self.trianglemix = trianglemix
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams,
        stats: GenerationStats | None = None, seed: int | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids (EOS included when it ends the sequence).

        ``seed`` overrides the request seed (an ``EngineRequest``'s resolved one, so that
        this path draws what the engines draw)."""
        validate_prompt(prompt_ids, vocab_size=self.config.vocab_size)
        max_tokens = resolve_max_tokens(
            len(prompt_ids), params.max_tokens, context=self.config.max_context_tokens
        )
        stats = stats if stats is not None else GenerationStats()
        stats.num_prompt_tokens = len(prompt_ids)
        seed = RequestSeed.of(params).value if seed is None else seed
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.config.eos_token_ids)
        cache = ContiguousKVCache.allocate(
            num_layers=self.config.num_layers, max_tokens=len(prompt_ids) + max_tokens,
            num_kv_heads=self.config.num_kv_heads, head_dim=self.config.head_dim,
            dtype=self.dtype, device=self.device,
        )
        tokens = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        start = 0
        for step in range(max_tokens):
            t0 = time.perf_counter()
            logits = self._forward(tokens, start, cache)
            token = sample_token(logits, params, seed, step)
            elapsed = time.perf_counter() - t0
            if step == 0:
                stats.prefill_s = elapsed
            else:
                stats.decode_s += elapsed
                stats.step_times_s.append(elapsed)
            stats.num_generated_tokens = step + 1
            yield token
            if token in stop_ids:
                return
            start += tokens.shape[0]
            tokens = torch.tensor([token], dtype=torch.long, device=self.device)

    def _forward(self, tokens: torch.Tensor, start: int, cache: ContiguousKVCache) -> torch.Tensor:
        num_tokens = tokens.shape[0]
        positions = torch.arange(start, start + num_tokens, device=self.device)
        if start == 0:  # the prompt: written into views of the cache
            kv = PackedKV(k=[k[:num_tokens] for k in cache.k], v=[v[:num_tokens] for v in cache.v])
            metadata = PrefillAttention(kv, num_tokens, self.model.scale, self.trianglemix)
        else:
            metadata = ContiguousAttention(cache=cache, start=start, scale=self.model.scale)
        hidden = self.model(tokens, positions, metadata)
        return self.model.compute_logits(hidden[-1:])[0]
