"""Runs a synchronous engine's step loop on its own thread for asyncio callers.

The engines are single-threaded and step-driven; servers are asyncio. ``EngineLoop`` owns the
engine: every call on it (``call``) runs on the engine thread between steps, and each step's
outputs are dispatched to per-request asyncio queues.

Life of the loop:
1. ``start`` launches the thread; ``heartbeat`` is refreshed on every turn (health checks
   follow it).
2. Each turn: run queued calls (add, abort, kv_complete...) → if the engine has work, ``step``
   and dispatch outputs → else wait for the next call (bounded, so the heartbeat stays fresh).
   A turn that ran no forward (e.g. only KV pulls pending) sleeps briefly instead of spinning.
3. ``stop`` ends the thread, or a crash does; every open stream and every call still queued
   gets ``EngineLoopStopped`` (no caller waits on a dead loop).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from disagg.errors import DisaggError

_IDLE_WAIT_S = 0.5
_PENDING_WAIT_S = 0.002


class EngineLoopStopped(DisaggError):
    """The engine loop stopped (shutdown or a crash) before the request finished."""


class SteppedEngine(Protocol):
    def step(self) -> list: ...

    def has_unfinished(self) -> bool: ...

    @property
    def num_forwards(self) -> int: ...


class EngineLoop:
    """The engine thread and its bridge to one asyncio event loop."""

    def __init__(self, engine: SteppedEngine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self._loop = loop
        self._calls: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.heartbeat = time.monotonic()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._calls.put(None)
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def call(self, fn: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``fn(engine)`` on the engine thread; the future gets its result or exception."""
        future = self._loop.create_future()
        if not self.alive:
            future.set_exception(EngineLoopStopped("the engine loop is not running"))
            return future
        self._calls.put((fn, future))
        if self._stopped.is_set():  # the loop died between the check and the put
            self._fail_pending()
        return future

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """Register a queue for a request's outputs (before the request is added)."""
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self.heartbeat = time.monotonic()
                busy = self.engine.has_unfinished()
                self._run_calls(block=not busy)
                if not self.engine.has_unfinished():
                    continue
                forwards = self.engine.num_forwards
                for out in self.engine.step():
                    self._dispatch(out.request_id, out)
                if self.engine.num_forwards == forwards:
                    time.sleep(_PENDING_WAIT_S)
        except BaseException as e:  # noqa: BLE001 (the loop must never die silently)
            self.error = e
        finally:
            self._stopped.set()
            self._fail_pending()  # a call queued behind the crash would wait for ever
            for request_id in list(self._streams):
                self._dispatch(request_id, EngineLoopStopped(f"engine loop stopped: {self.error}"))

    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=_IDLE_WAIT_S) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 (the caller's future gets any error)
                self._loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self) -> None:
        """Fail every queued call with ``EngineLoopStopped`` (after ``_stopped`` is set, so
        no call can be queued unseen behind this)."""
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                error = EngineLoopStopped(f"the engine loop stopped: {self.error}")
                self._loop.call_soon_threadsafe(_set_exception, item[1], error)

    def _dispatch(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, item)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
