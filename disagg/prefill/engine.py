"""Prefill engine: prompt -> first token, with the prompt's KV handed to a sink layer by layer.

Life of a request here:
1. ``open_writer(offers)``: a KV writer for the first destination decode offered that one of
   this engine's senders can reach (decode reserved the rows before the request came here).
2. ``prefill(request, writer)`` runs one forward over the prompt (dense layers + TriangleMix's
   Triangle layers); each layer's K/V go to the writer the moment they are computed, so the
   transfer overlaps the remaining layers. ``cancelled`` is checked between layers.
3. Token 0 is sampled at the last position with the request's keyed seed (step 0), so it is
   the token the local path would pick; it is returned at once, before any write is confirmed.
4. The caller then ``finish``es the writer (every layer confirmed: a ``KVCompletion`` tagged
   with the ``KVFingerprint``) or ``abort``s it (token 0 ended the request, or it was cancelled).
Without a writer, ``prefill`` keeps the KV in a ``PackedKV`` (local use, tests).
The engine owns its senders; while un-pulled object-store KV exceeds ``max_leased_bytes`` it
refuses work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from disagg.attention.prefill import KVSink, PrefillAttention
from disagg.attention.triangle import TriangleMixConfig, attention_tag
from disagg.errors import DisaggError, KVTransferError
from disagg.kv.layout import KVFingerprint, KVLayout, PackedKV
from disagg.models.llama import LlamaForCausalLM
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, sample
from disagg.transport.base import KVDestination, KVSender, KVWriter


class PrefillBusyError(DisaggError):
    """Un-pulled KV exceeds the prefill side's budget: retry later (maps to 503)."""


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill-side limits (how long a lease lasts is its sender's: ``RayObjectStoreKVSender``)."""

    max_leased_bytes: int = 8 << 30  # refuse new prompts while un-pulled KV exceeds this

    def __post_init__(self):
        if self.max_leased_bytes <= 0:
            raise ValueError("max_leased_bytes must be positive")


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill produced for one request (``kv`` only when no writer was given)."""

    request_id: str
    first_token: SampledToken
    fingerprint: KVFingerprint
    prefill_s: float
    kv: PackedKV | None = field(default=None, repr=False)


class PrefillEngine:
    """Runs prefills on one device; hands their KV to writers of its senders."""

    def __init__(self, model: LlamaForCausalLM, *, model_name: str,
                 trianglemix: TriangleMixConfig | None = None,
                 senders: tuple[KVSender, ...] = (), config: PrefillConfig = PrefillConfig()):
        if trianglemix is not None:
            trianglemix.validate_for(model.config.num_layers)
        self.model = model
        self.model_name = model_name
        self.trianglemix = trianglemix
        self.senders = {s.backend: s for s in senders}
        self.config = config
        self.layout = KVLayout.of_model(model)
        self.device = next(model.parameters()).device

    def fingerprint(self, num_prompt_tokens: int) -> KVFingerprint:
        return KVFingerprint(self.model_name, str(self.layout.dtype), self.layout.tag,
                             attention_tag(self.trianglemix), num_prompt_tokens)

    def open_writer(self, offers: tuple[KVDestination, ...]) -> KVWriter:
        """A writer for the first offered destination one of this engine's senders accepts."""
        for destination in offers:
            sender = self.senders.get(destination.backend)
            if sender is not None and sender.accepts(destination):
                return sender.open(destination, num_layers=self.layout.num_layers)
        raise KVTransferError(f"none of the offered KV destinations "
                              f"({[d.backend for d in offers]}) is reachable from this prefill "
                              f"engine (senders: {sorted(self.senders)})")

    @torch.inference_mode()
    def prefill(self, request: EngineRequest, sink: KVSink | None = None,
                cancelled: Callable[[], bool] | None = None) -> PrefillResult:
        t0 = time.perf_counter()
        n = request.num_prompt_tokens
        kv = PackedKV.empty(self.layout, n, self.device) if sink is None else None
        metadata = PrefillAttention(sink or kv, n, self.model.scale, self.trianglemix, cancelled)
        tokens = request.prompt_tensor(self.device)
        hidden = self.model(tokens, torch.arange(n, device=self.device), metadata)
        logits = self.model.compute_logits(hidden[-1:])[0]
        first = sample(logits, request.params, request.seed, step=0)  # syncs the compute stream
        return PrefillResult(request.request_id, first, self.fingerprint(n),
                             time.perf_counter() - t0, kv)

    def leased(self) -> tuple[int, int]:
        """KV leases held by this engine's senders and their bytes (published, not yet copied)."""
        counts = [s.leased() for s in self.senders.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def check_capacity(self) -> None:
        """Raise ``PrefillBusyError`` while un-pulled object-store KV exceeds the budget."""
        for sender in self.senders.values():
            _, leased_bytes = sender.leased()
            if leased_bytes > self.config.max_leased_bytes:
                raise PrefillBusyError(
                    f"{leased_bytes} bytes of KV wait to be pulled (budget "
                    f"{self.config.max_leased_bytes}); retry later")


def first_token_finish_reason(request: EngineRequest, token_id: int,
                              eos_token_ids: tuple[int, ...]) -> str | None:
    """Why the request ends at token 0 (``"stop"``/``"length"``), or None if it goes on."""
    params = request.params
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
        return "stop"
    if request.max_tokens == 1:
        return "length"
    return None
