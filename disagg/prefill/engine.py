"""Prefill engine: prompt -> first token + the prompt's complete KV cache + its fingerprint.

Life of a request here:
1. ``prefill`` runs one forward over the prompt (dense layers + TriangleMix's Triangle layers),
   writing every layer's K/V straight into a ``PackedKV``.
2. Token 0 is sampled at the last position with the request's keyed seed (step 0), so it is
   the token the local path would pick.
3. The KV is tagged with a ``KVFingerprint`` (model, dtype, layout, attention, prompt length).
4. ``prefill_and_publish`` hands the KV to the engine's ``KVSender`` under a lease, unless
   token 0 already ends the request (EOS, a stop id, max_tokens = 1): then no lease is taken.
The engine owns its sender; while un-pulled KV exceeds ``max_leased_bytes`` it refuses work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from disagg.attention.prefill import PrefillAttention
from disagg.attention.triangle import TriangleMixConfig, attention_tag
from disagg.errors import DisaggError
from disagg.kv.layout import KVFingerprint, KVLayout, PackedKV
from disagg.models.llama import LlamaForCausalLM
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, sample
from disagg.transport.base import KVHandle, KVHeader, KVSender


class PrefillBusyError(DisaggError):
    """Un-pulled KV exceeds the prefill side's budget: retry later (maps to 503)."""


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill-side limits."""

    lease_s: float = 60.0  # how long published KV waits to be pulled before it is freed
    max_leased_bytes: int = 8 << 30  # refuse new prompts while un-pulled KV exceeds this

    def __post_init__(self):
        if self.lease_s <= 0 or self.max_leased_bytes <= 0:
            raise ValueError("lease_s and max_leased_bytes must be positive")


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill produced for one request."""

    request_id: str
    first_token: SampledToken
    fingerprint: KVFingerprint
    kv: PackedKV = field(repr=False)
    prefill_s: float


@dataclass(frozen=True)
class PublishedPrefill:
    """A prefill whose KV waits under a lease (``handle`` None: the request already ended)."""

    request_id: str
    first_token: SampledToken
    fingerprint: KVFingerprint
    handle: KVHandle | None
    finish_reason: str | None  # "stop" / "length" when token 0 ends the request
    prefill_s: float


class PrefillEngine:
    """Runs prefills on one device and publishes their KV through its sender."""

    def __init__(self, model: LlamaForCausalLM, *, model_name: str,
                 trianglemix: TriangleMixConfig | None = None,
                 sender: KVSender | None = None, config: PrefillConfig = PrefillConfig()):
        if trianglemix is not None:
            trianglemix.validate_for(model.config.num_layers)
        self.model = model
        self.model_name = model_name
        self.trianglemix = trianglemix
        self.sender = sender
        self.config = config
        self.layout = KVLayout.of_model(model)
        self.device = next(model.parameters()).device

    def fingerprint(self, num_prompt_tokens: int) -> KVFingerprint:
        return KVFingerprint(self.model_name, str(self.layout.dtype), self.layout.tag,
                             attention_tag(self.trianglemix), num_prompt_tokens)

    @torch.inference_mode()
    def prefill(self, request: EngineRequest) -> PrefillResult:
        t0 = time.perf_counter()
        n = request.num_prompt_tokens
        kv = PackedKV.empty(self.layout, n, self.device)
        metadata = PrefillAttention(kv=kv, scale=self.model.scale, trianglemix=self.trianglemix)
        tokens = torch.tensor(request.prompt_token_ids, dtype=torch.long, device=self.device)
        hidden = self.model(tokens, torch.arange(n, device=self.device), metadata)
        logits = self.model.compute_logits(hidden[-1:])[0]
        first = sample(logits, request.params, request.seed, step=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return PrefillResult(request.request_id, first, self.fingerprint(n), kv,
                             time.perf_counter() - t0)

    def check_capacity(self) -> None:
        """Raise ``PrefillBusyError`` while un-pulled KV exceeds the budget."""
        if self.sender is None:
            return
        self.sender.expire()
        if self.sender.leased_bytes > self.config.max_leased_bytes:
            raise PrefillBusyError(
                f"{self.sender.leased_bytes} bytes of KV wait to be pulled (budget "
                f"{self.config.max_leased_bytes}); retry later")

    def prefill_and_publish(self, request: EngineRequest, eos_token_ids: tuple[int, ...] = ()
                            ) -> PublishedPrefill:
        if self.sender is None:
            raise ValueError("this prefill engine has no KV sender")
        self.check_capacity()
        result = self.prefill(request)
        reason = first_token_finish_reason(request, result.first_token.token_id, eos_token_ids)
        handle = None
        if reason is None:
            header = KVHeader(request.request_id, result.fingerprint, result.first_token.token_id)
            handle = self.sender.publish(header, result.kv, lease_s=self.config.lease_s)
        return PublishedPrefill(request.request_id, result.first_token, result.fingerprint,
                                handle, reason, result.prefill_s)


def first_token_finish_reason(request: EngineRequest, token_id: int,
                              eos_token_ids: tuple[int, ...]) -> str | None:
    """Why the request ends at token 0 (``"stop"``/``"length"``), or None if it goes on."""
    params = request.params
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if request.max_tokens == 1:
        return "length"
    return None
