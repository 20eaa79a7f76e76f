"""A request inside the decode engine: its status, tokens, blocks; and the engine's output.

Life of a request (statuses in order):
1. WAITING_FOR_REMOTE_KV -- ``add_remote_request``: its prompt blocks are reserved (or it
   waits, FIFO, for the pool to have them), then its KV destination is named; prefill writes
   there; ``kv_complete`` brings token 0 and prefill's completion record.
2. WAITING -- queued for a forward: a local prompt (``add_request``), a remote request whose
   KV has arrived in its blocks, or a preempted request to be recomputed.
3. RUNNING -- in every forward until it finishes: prefill chunks, then one decode row a step.
4. FINISHED_* -- stop (EOS / stop id), length (max_tokens), aborted, or error (KV pull failed
   or mismatched). Its blocks are back in the pool (or fenced until no writer can touch them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from disagg.errors import DisaggError
from disagg.kv.block_pool import BlockTable
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.base import KVDestination

FinishReason = Literal["stop", "length", "abort", "error"]


class RequestStatus(enum.IntEnum):
    """Where a request is in the decode engine.

    Ordering rule: unfinished statuses come first, in lifecycle order, and every status greater
    than RUNNING is a finished one (``is_finished`` relies on it). A new unfinished status goes
    before RUNNING; a new finished one after it, with its finish reason in ``finish_reason``.
    """

    WAITING_FOR_REMOTE_KV = 1
    WAITING = 2
    RUNNING = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class TokenOutput:
    """One step's news about one request: a generated token, its end, or both.

    Each request's outputs end with exactly one ``finished=True`` one, except after ``abort``
    (the caller already knows). ``token`` is None when the request ended without a new token
    (its first token, sampled by prefill, ended it; or its KV pull failed: ``error``).
    """

    request_id: str
    token: SampledToken | None
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: DisaggError | None = None
    kv_recomputed: bool = False  # on the last output: remote KV was recomputed after preemption
    kv_receive_s: float | None = None  # on a remote request's first decoded token: seconds
    # from ``kv_complete`` until the receiver had the KV in the pool (copies on decode's side)


@dataclass(eq=False)
class DecodeRequest:
    """Mutable engine-side state of one request (owned by the scheduler)."""

    request: EngineRequest
    status: RequestStatus
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed_tokens: int = 0  # tokens whose K/V are in this request's blocks
    block_table: BlockTable = field(default_factory=BlockTable)
    offers: tuple[KVDestination, ...] = ()  # where prefill may write its KV (remote only)
    kv_completed: bool = False  # prefill's completion record arrived: its writer has stopped
    kv_attention: str | None = None  # attention config of the prefill that made its KV
    kv_recomputed: bool = False  # preempted after arrival: decode recomputed the KV densely
    fence_grace_s: float | None = None  # cancelled mid-prefill: fence its rows this long
    kv_completed_at: float | None = None  # engine clock at kv_complete
    kv_receive_s: float | None = None  # kv_complete -> KV in the pool, reported once
    deadline: float | None = None  # of the remote wait (reservation until the KV is usable)
    error: DisaggError | None = None

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """Generated tokens so far; also the index of the next one (its sampling step)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def finish_status_after(self, token_id: int, eos_token_ids: tuple[int, ...]
                            ) -> RequestStatus | None:
        """The finished status the just-appended ``token_id`` puts this request in, if any
        (a stop id or EOS wins over length, as in vLLM)."""
        params = self.request.params
        if token_id in params.stop_token_ids or (
                not params.ignore_eos and token_id in eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if self.num_generated_tokens >= self.request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
