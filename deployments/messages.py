"""Typed messages between the deployments (Ray pickles them; nothing here is user-controlled)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.openai.errors import APIError
from disagg.sampling import SampledToken

# Request ids of the replicas' own start-up requests: prefill leaves them out of its counts
# and measurements (they are not traffic).
WARMUP_PREFIX = "warmup-"


def is_warmup(request_id: str) -> bool:
    return request_id.startswith(WARMUP_PREFIX)


@dataclass(frozen=True)
class StreamItem:
    """One item of a decode replica's token stream to the ingress.

    ``error`` set: the request failed (before the first token it becomes the HTTP status).
    ``timing``: on the last item of a disaggregated request, its ``HandoffTiming.to_dict()``
    (queue, prefill, transfer, first decode seconds; KV backend, bytes, GB/s).
    """

    token: SampledToken | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: APIError | None = None
    timing: dict | None = None


@dataclass(frozen=True)
class DecodeStats:
    num_free_blocks: int
    num_total_blocks: int
    has_unfinished: bool
    num_forwards: int
    num_fenced_blocks: int = 0


@dataclass(frozen=True)
class PrefillStats:
    num_leases: int  # object-store KV published and not yet copied by decode
    leased_bytes: int
    num_prefills: int
    num_running: int = 0  # prefills queued or running on the worker
    num_warmups: int = 0  # decode replicas' start-up requests served (not in num_prefills)
