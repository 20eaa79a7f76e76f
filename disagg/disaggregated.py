"""The life of a disaggregated request, written once: the Serve app and the CLI both run it.

1. RECEIVED -> ROUTED: ``DecodeClient.reserve`` -- decode reserves the prompt's blocks (FIFO,
   with a deadline) and offers its KV destinations; prefill is never called before this.
2. PREFILLING: ``PrefillClient.prefill`` runs the prompt on a prefill worker, each layer's K/V
   written towards the destination as soon as it is computed.
3. FIRST_TOKEN: the prefill stream's first event is token 0; it is yielded at once (no KV wait
   stands before it). If token 0 ends the request (EOS, a stop id, max_tokens = 1), prefill
   aborts its writer and the request ends here.
4. KV_COMPLETE: the prefill stream's second event is the ``KVCompletion`` record (every layer
   confirmed written); ``DecodeClient.kv_complete`` checks it (fingerprint, token 0) and the
   decode engine makes the KV usable. Decode never decodes without this record.
5. DECODING: tokens 1.. stream from the decode engine until the request finishes.
   A hand-off that fails after token 0 (no completion in time, a lost prefill replica, a
   rejected record) ends the request with a clear error, or, with ``on_kv_failure =
   "local_prefill"``, decode recomputes prompt + token 0 densely and goes on (reported as
   ``kv_recomputed``).
6. END (any exit: finish, error, client gone, a deadline): the decode request is aborted
   (blocks freed); if the prefill stream had not ended, it is cancelled (the worker stops at
   its next layer) and the request's rows stay fenced for ``cancel_grace_s`` at most; once the
   prefill stream has ended, ``writer_done`` frees them at once. A request that ends after
   token 0 but before taking its completion record still takes it (``_claim_orphan``, within
   ``cancel_grace_s``) and gives it to the engine, which frees its lease and rows at once.
``HandoffTiming`` records queue, prefill, exposed transfer and first decode time per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from disagg.decode.request import TokenOutput
from disagg.errors import DisaggError, KVTransferError
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.base import KVCompletion, KVDestination


class PrefillUnavailableError(DisaggError):
    """No prefill worker could take the request (before token 0): decode may prefill it."""


@dataclass(frozen=True)
class FirstToken:
    """The prefill stream's first event."""

    token: SampledToken
    finish_reason: str | None  # "stop" / "length" when token 0 ends the request
    queue_s: float  # waiting for the prefill worker
    prefill_s: float  # the forward, until token 0 was sampled
    # Wall-clock times (``time.time()``) on the prefill side: "prefill_received" (queued for
    # the worker, once the replica has read the offers and checked its capacity),
    # "prefill_started" (the worker took it), "prefill_token0" (token 0 sent).
    marks: dict[str, float] = field(default_factory=dict)


PrefillEvent = FirstToken | KVCompletion


class PrefillClient(Protocol):
    """Where prefills run: a Serve deployment, or an engine in this process."""

    def prefill(self, request: EngineRequest, offers: tuple[KVDestination, ...]
                ) -> AsyncIterator[PrefillEvent]:
        """FirstToken, then (unless it ended the request) the KVCompletion. Raises
        ``PrefillUnavailableError`` before the first event when no worker can take it.
        Closing the iterator early cancels the prefill."""
        ...


class DecodeClient(Protocol):
    """The decode engine, as the life of a request needs it."""

    async def reserve(self, request: EngineRequest) -> tuple[KVDestination, ...]: ...

    async def kv_complete(self, request_id: str, first_token: SampledToken,
                          completion: KVCompletion) -> None: ...

    def outputs(self, request_id: str) -> AsyncIterator[TokenOutput]: ...

    async def add_local(self, request: EngineRequest, generated: tuple[int, ...] = ()
                        ) -> None: ...

    def writer_done(self, request_id: str) -> None: ...

    def abort(self, request_id: str, *, fence_grace_s: float | None = None) -> None: ...


@dataclass
class HandoffTiming:
    """One disaggregated request's time to first and second token, by stage (seconds)."""

    queue_s: float = 0.0  # reserving blocks + waiting for the prefill worker
    prefill_s: float = 0.0  # prefill forward until token 0
    transfer_s: float | None = None  # token 0 at decode -> KV usable in decode's pool
    first_decode_s: float | None = None  # KV usable -> token 1
    backend: str | None = None
    kv_bytes: int = 0
    kv_recomputed: bool = False  # preempted after arrival: decode recomputed the KV densely
    # Wall-clock times (``time.time()``, one clock per node) of the hops to token 0: prefill's
    # marks (``FirstToken.marks``), "decode_received" (this request reached decode),
    # "decode_reserved" (its blocks), "decode_token0" (token 0 back at decode); the ingress
    # adds its own. Where a first request's extra time goes shows here.
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def kv_gbps(self) -> float | None:
        if not self.kv_bytes or not self.transfer_s:
            return None
        return self.kv_bytes / self.transfer_s / 1e9

    def to_dict(self) -> dict:
        return {"queue_s": self.queue_s, "prefill_s": self.prefill_s,
                "transfer_s": self.transfer_s, "first_decode_s": self.first_decode_s,
                "kv_backend": self.backend, "kv_bytes": self.kv_bytes, "kv_gbps": self.kv_gbps,
                "kv_recomputed": self.kv_recomputed, "marks": dict(self.marks)}


@dataclass(frozen=True)
class HandoffConfig:
    """Deadlines of the hand-off, and what a failed one does."""

    kv_complete_timeout_s: float = 300.0  # token 0 -> completion record (and stream end)
    first_token_timeout_s: float = 300.0  # prefill call -> token 0 (a prefill that hangs)
    cancel_grace_s: float = 10.0  # a cancelled prefill writes at most this long after
    on_kv_failure: str = "error"  # "error": end the request; "local_prefill": decode recomputes

    def __post_init__(self):
        if self.on_kv_failure not in ("error", "local_prefill"):
            raise ValueError("on_kv_failure must be 'error' or 'local_prefill'")


async def serve_disaggregated(request: EngineRequest, prefill: PrefillClient,
                              decode: DecodeClient, timing: HandoffTiming,
                              config: HandoffConfig = HandoffConfig()
                              ) -> AsyncIterator[TokenOutput]:
    """Tokens of ``request``, token 0 (from prefill) first; ``timing`` is filled as it goes."""
    rid = request.request_id
    t0 = time.perf_counter()
    timing.marks["decode_received"] = time.time()
    events: _PrefillStream | None = None
    first: FirstToken | None = None
    pending: asyncio.Future | None = None  # the completion record, awaited shielded
    handed = False  # the completion record went to the engine (which frees what it holds)
    try:
        offers = await decode.reserve(request)
        reserved_s = time.perf_counter() - t0
        timing.marks["decode_reserved"] = time.time()
        events = _PrefillStream(prefill.prefill(request, offers))
        try:
            first = await asyncio.wait_for(events.next(), config.first_token_timeout_s)
        except TimeoutError as e:
            raise KVTransferError(f"no token 0 from prefill for {rid!r} within "
                                  f"{config.first_token_timeout_s} s") from e
        if not isinstance(first, FirstToken):
            raise KVTransferError(f"prefill of {rid!r} sent {type(first).__name__} first")
        timing.queue_s, timing.prefill_s = reserved_s + first.queue_s, first.prefill_s
        timing.marks.update(first.marks, decode_token0=time.time())
        t_token0 = time.perf_counter()
        yield TokenOutput(rid, first.token, first.finish_reason is not None,
                          first.finish_reason)
        if first.finish_reason is not None:
            await _bounded(events.expect_end(), config.kv_complete_timeout_s, rid)
            return
        try:
            # Awaited shielded: a request cancelled now leaves the wait running, and the
            # record that still comes is handed to the engine (``_claim_orphan``).
            pending = asyncio.ensure_future(
                _completion(events, config.kv_complete_timeout_s, rid))
            completion = await asyncio.shield(pending)
            # Handed to the engine before anything else is awaited: from here every exit
            # (an abort included) releases what the record holds (the object store's lease).
            handed = True
            await decode.kv_complete(rid, first.token, completion)
            await _bounded(events.expect_end(), config.kv_complete_timeout_s, rid)
        except DisaggError:
            if config.on_kv_failure != "local_prefill":
                raise
            decode.abort(rid, fence_grace_s=None if events.ended else config.cancel_grace_s)
            await decode.add_local(request, generated=(first.token.token_id,))
            timing.kv_recomputed = True
        else:
            timing.backend, timing.kv_bytes = completion.backend, completion.num_bytes
        t_kv = time.perf_counter()
        timing.transfer_s = t_kv - t_token0
        async for out in decode.outputs(rid):
            if timing.first_decode_s is None and out.token is not None:
                # Decode-side copies (the object store's) end inside the step that ran it.
                receive_s = out.kv_receive_s or 0.0
                timing.transfer_s += receive_s
                timing.first_decode_s = time.perf_counter() - t_kv - receive_s
            timing.kv_recomputed |= out.kv_recomputed
            yield out
            if out.finished:
                return
    finally:
        if events is None or events.ended:  # nothing can write to its rows any more
            decode.abort(rid)
            decode.writer_done(rid)
        else:
            decode.abort(rid, fence_grace_s=config.cancel_grace_s)
            if isinstance(first, FirstToken) and first.finish_reason is None and not handed:
                # Past token 0 prefill only confirms its writes: its record may be on the way
                # (or already here). Take it within the grace, then free what it holds.
                _ORPHANS.add(task := asyncio.ensure_future(_claim_orphan(
                    events, pending, decode, rid, first.token, config.cancel_grace_s)))
                task.add_done_callback(_ORPHANS.discard)
            else:
                await events.aclose()


_ORPHANS: set[asyncio.Future] = set()  # claims in flight (a task needs a reference to live)


async def _claim_orphan(events: _PrefillStream, pending: asyncio.Future | None,
                        decode: DecodeClient, rid: str, token: SampledToken,
                        grace_s: float) -> None:
    """The completion record of a request that ended after token 0 without taking it: given
    to the engine, which no longer knows the request and so releases the record's lease and
    the rows' fence at once; none within ``grace_s``: the prefill stream is closed."""
    if pending is None:
        pending = asyncio.ensure_future(_completion(events, grace_s, rid))
    try:
        # No record in time, or the engine is gone: nothing to free here.
        with contextlib.suppress(Exception):
            completion = await asyncio.wait_for(asyncio.shield(pending), grace_s)
            await decode.kv_complete(rid, token, completion)
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        with contextlib.suppress(Exception):
            await events.aclose()


async def _completion(events: _PrefillStream, timeout_s: float, rid: str) -> KVCompletion:
    """The completion record, the prefill stream's last event."""
    try:
        completion = await asyncio.wait_for(events.next(), timeout_s)
    except TimeoutError as e:
        raise KVTransferError(f"no KV completion for {rid!r} within {timeout_s} s of "
                              "token 0") from e
    except StopAsyncIteration as e:
        raise KVTransferError(f"prefill of {rid!r} ended without completing its KV") from e
    if not isinstance(completion, KVCompletion):
        raise KVTransferError(f"prefill of {rid!r} sent {type(completion).__name__}, not the "
                              "KV completion")
    return completion


async def _bounded(end, timeout_s: float, rid: str) -> None:
    """The prefill stream's end (it follows its last event at once), under a deadline."""
    try:
        await asyncio.wait_for(end, timeout_s)
    except TimeoutError as e:
        raise KVTransferError(f"the prefill stream of {rid!r} did not end within {timeout_s} s "
                              "of its last event") from e


class _PrefillStream:
    """The prefill events of one request; ``ended`` once the stream finished or failed (its
    writer then stopped), not when it was merely cancelled from this side."""

    def __init__(self, events: AsyncIterator[PrefillEvent]):
        self._events = events
        self.ended = False

    async def next(self) -> PrefillEvent:
        try:
            return await anext(self._events)
        except asyncio.CancelledError:
            raise
        except BaseException:  # StopAsyncIteration, or the prefill failed: it wrote its last
            self.ended = True
            raise

    async def expect_end(self) -> None:
        try:
            event = await self.next()
        except StopAsyncIteration:
            return
        raise KVTransferError(f"unexpected prefill event after the last one: {event!r}")

    async def aclose(self) -> None:
        await self._events.aclose()
