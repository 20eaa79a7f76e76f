"""``DecodeLoopClient``: the decode engine, driven on its ``EngineLoop`` thread, as the life of a
disaggregated request (``disagg/disaggregated.py``) needs it. The DecodeServer and the
in-process pipeline both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from disagg.decode.request import TokenOutput
from disagg.engine_loop import EngineLoop, EngineLoopStopped
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.base import KVCompletion, KVDestination

_RESERVE_POLL_S = (0.001, 0.05)  # first and longest wait between reservation checks


class DecodeLoopClient:
    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self._streams: dict[str, asyncio.Queue] = {}

    async def reserve(self, request: EngineRequest) -> tuple[KVDestination, ...]:
        """Add ``request`` as remote and wait until its blocks are reserved; its offers."""
        rid = request.request_id
        stream = self._streams[rid] = self.loop.open_stream(rid)
        def add(engine):
            engine.add_remote_request(request)
            return engine.destinations(rid)  # reserved at once when the pool has room

        offers = await self.loop.call(add)
        wait, longest = _RESERVE_POLL_S
        while not offers:
            if not stream.empty():  # it ended while queued (its deadline passed)
                _raise_if_error(stream.get_nowait())
            await asyncio.sleep(wait)
            wait = min(2 * wait, longest)
            offers = await self.loop.call(lambda engine: engine.destinations(rid))
        return offers

    async def kv_complete(self, request_id: str, first_token: SampledToken,
                          completion: KVCompletion) -> None:
        await self.loop.call(lambda engine: engine.kv_complete(request_id, first_token,
                                                               completion))

    async def add_local(self, request: EngineRequest, generated: tuple[int, ...] = ()) -> None:
        """Queue ``request`` for this engine to prefill itself (after ``generated``)."""
        self._streams[request.request_id] = self.loop.open_stream(request.request_id)
        await self.loop.call(lambda engine: engine.add_request(request, generated))

    async def outputs(self, request_id: str) -> AsyncIterator[TokenOutput]:
        stream = self._streams[request_id]
        while True:
            out = await stream.get()
            if isinstance(out, EngineLoopStopped):
                raise out
            yield out
            if out.finished:
                return

    def writer_done(self, request_id: str) -> None:
        self._fire(lambda engine: engine.writer_done(request_id))

    def abort(self, request_id: str, *, fence_grace_s: float | None = None) -> None:
        """End the request in the engine (idempotent: after a finish it is already gone)."""
        self._streams.pop(request_id, None)
        self.loop.close_stream(request_id)
        self._fire(lambda engine: engine.abort(request_id, fence_grace_s=fence_grace_s))

    def _fire(self, fn) -> None:
        done = self.loop.call(fn)
        done.add_done_callback(lambda f: f.exception())  # nobody awaits it: consume errors


def _raise_if_error(out) -> None:
    if isinstance(out, EngineLoopStopped):
        raise out
    if out.error is not None:
        raise out.error
    raise RuntimeError(f"request {out.request_id!r} ended while waiting for blocks")
