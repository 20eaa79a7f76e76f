"""Typed messages between the deployments (Ray pickles them; nothing here is user-controlled)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.openai.errors import APIError
from disagg.sampling import SampledToken


@dataclass(frozen=True)
class StreamItem:
    """One item of a decode replica's token stream to the ingress.

    ``error`` set: the request failed (before the first token it becomes the HTTP status).
    ``prefill_s``: on the first item of the disaggregated path, the prefill time.
    """

    token: SampledToken | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: APIError | None = None
    prefill_s: float | None = None


@dataclass(frozen=True)
class DecodeStats:
    num_free_blocks: int
    num_total_blocks: int
    has_unfinished: bool
    num_forwards: int


@dataclass(frozen=True)
class PrefillStats:
    num_leases: int
    leased_bytes: int
    num_prefills: int
