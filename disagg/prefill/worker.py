"""The prefill side of a disaggregated request: one worker thread, token 0 first, then the KV.

Life of a request here (``run_prefill``, used by the PrefillServer and the in-process client):
1. Queued for the engine's single worker thread (``queue_s``).
2. On the worker: a writer is opened for the first offered destination this engine can
   reach, and the prompt runs, each layer's K/V handed to the writer as it is computed.
3. Token 0 is yielded (``FirstToken``) the moment it is sampled.
4. Unless token 0 ended the request (then the writer is aborted), ``finish`` waits for every
   layer's write off the worker thread (the next prefill can start meanwhile) and the
   ``KVCompletion`` record is yielded.
Cancellation (the caller closes the stream, or Serve cancels the call) is seen by the worker
between layers; the stream ends only after the worker has stopped and the writer is aborted,
so nothing is written after it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

from disagg.disaggregated import FirstToken, PrefillEvent
from disagg.prefill.engine import PrefillEngine, first_token_finish_reason
from disagg.request import EngineRequest
from disagg.transport.base import KVDestination, KVHeader


async def run_prefill(engine: PrefillEngine, request: EngineRequest,
                      offers: tuple[KVDestination, ...], *, executor: ThreadPoolExecutor,
                      eos_token_ids: tuple[int, ...],
                      around: Callable[[EngineRequest], AbstractContextManager] | None = None
                      ) -> AsyncIterator[PrefillEvent]:
    """``around``: a context the worker runs the prefill in (``FirstPrefillProfiler.around``)."""
    cancelled = threading.Event()
    t_submit = time.perf_counter()
    marks = {"prefill_received": time.time()}

    def work():
        t_start = time.perf_counter()
        marks["prefill_started"] = time.time()
        if cancelled.is_set():
            raise asyncio.CancelledError()
        with around(request) if around is not None else nullcontext():
            writer = engine.open_writer(offers)
            try:
                return writer, engine.prefill(request, writer, cancelled.is_set), t_start
            except BaseException:
                writer.abort()
                raise

    future = executor.submit(work)
    writer = None
    try:
        writer, result, t_start = await asyncio.wrap_future(future)
        reason = first_token_finish_reason(request, result.first_token.token_id, eos_token_ids)
        marks["prefill_token0"] = time.time()
        yield FirstToken(result.first_token, reason, t_start - t_submit, result.prefill_s, marks)
        if reason is not None:
            writer.abort()
            return
        header = KVHeader(request.request_id, result.fingerprint, result.first_token.token_id)
        yield await asyncio.to_thread(writer.finish, header)
    except BaseException:
        cancelled.set()
        if writer is None:  # still queued or running: wait until the worker has stopped
            await asyncio.shield(asyncio.to_thread(_stopped_writer, future))
        else:
            await asyncio.to_thread(writer.abort)
        raise


def _stopped_writer(future: Future) -> None:
    """Wait for a cancelled prefill's worker; abort the writer if it finished anyway."""
    try:
        writer, _, _ = future.result()
    except BaseException:  # noqa: BLE001 (cancelled or failed: it aborted its own writer)
        return
    writer.abort()


class LocalPrefillClient:
    """A ``PrefillClient`` over a prefill engine in this process (the CLI, tests)."""

    def __init__(self, engine: PrefillEngine, eos_token_ids: tuple[int, ...] = ()):
        self.engine = engine
        self.eos_token_ids = eos_token_ids
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")

    def prefill(self, request: EngineRequest, offers: tuple[KVDestination, ...]
                ) -> AsyncIterator[PrefillEvent]:
        return run_prefill(self.engine, request, offers, executor=self._executor,
                           eos_token_ids=self.eos_token_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
