"""EngineLoop: calls run on the engine thread, outputs reach their streams, and nothing that
waits on the loop outlives it -- a crash or a stop fails every open stream and every call
still queued with ``EngineLoopStopped``."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from disagg.engine_loop import EngineLoop, EngineLoopStopped

LIVENESS_S = 10.0  # a liveness deadline, not a speed bound: without it a hang is a hung CI


@dataclass(frozen=True)
class _Out:
    request_id: str
    value: int


class FakeEngine:
    """A stepped engine: each step emits one output per added request, for ``steps`` steps;
    ``gate`` (if set) holds a step until released, ``crash`` makes the held step raise."""

    def __init__(self, steps: int = 3):
        self.steps = steps
        self.requests: dict[str, int] = {}
        self.num_forwards = 0
        self.gate: threading.Event | None = None
        self.in_step = threading.Event()
        self.crash = False
        self.thread_name: str | None = None

    def add(self, request_id: str) -> None:
        self.thread_name = threading.current_thread().name
        self.requests[request_id] = 0

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        self.in_step.set()
        if self.gate is not None:
            self.gate.wait()
        if self.crash:
            raise RuntimeError("engine crashed")
        self.num_forwards += 1
        outs = []
        for rid in list(self.requests):
            self.requests[rid] += 1
            outs.append(_Out(rid, self.requests[rid]))
            if self.requests[rid] == self.steps:
                del self.requests[rid]
        return outs


async def _started(engine: FakeEngine) -> EngineLoop:
    loop = EngineLoop(engine, asyncio.get_running_loop())
    loop.start()
    return loop


def test_calls_run_on_the_engine_thread_and_outputs_reach_the_stream():
    async def main():
        engine = FakeEngine(steps=3)
        loop = await _started(engine)
        try:
            stream = loop.open_stream("r")
            await asyncio.wait_for(loop.call(lambda e: e.add("r")), LIVENESS_S)
            got = [(await asyncio.wait_for(stream.get(), LIVENESS_S)).value for _ in range(3)]
            assert got == [1, 2, 3] and engine.thread_name == "engine-loop"
            with pytest.raises(KeyError):  # the caller gets the call's own error
                await asyncio.wait_for(loop.call(lambda e: e.requests["missing"]), LIVENESS_S)
            assert loop.alive and loop.error is None
        finally:
            loop.stop()

    asyncio.run(main())


def test_a_crash_fails_open_streams_and_calls_queued_behind_it():
    async def main():
        engine = FakeEngine(steps=100)
        engine.gate = threading.Event()
        loop = await _started(engine)
        stream = loop.open_stream("r")
        await asyncio.wait_for(loop.call(lambda e: e.add("r")), LIVENESS_S)
        await asyncio.to_thread(engine.in_step.wait, LIVENESS_S)  # the loop is inside step()
        queued = [loop.call(lambda e, i=i: e.add(f"q{i}")) for i in range(3)]
        engine.crash = True
        engine.gate.set()
        for future in queued:  # each fails, none waits for ever
            with pytest.raises(EngineLoopStopped):
                await asyncio.wait_for(future, LIVENESS_S)
        item = await asyncio.wait_for(stream.get(), LIVENESS_S)
        assert isinstance(item, EngineLoopStopped) and "engine crashed" in str(item)
        assert not loop.alive and isinstance(loop.error, RuntimeError)
        with pytest.raises(EngineLoopStopped):  # and a call after the crash fails at once
            await asyncio.wait_for(loop.call(lambda e: None), LIVENESS_S)

    asyncio.run(main())


def test_stop_fails_calls_still_queued():
    async def main():
        engine = FakeEngine(steps=100)
        engine.gate = threading.Event()
        loop = await _started(engine)
        await asyncio.wait_for(loop.call(lambda e: e.add("r")), LIVENESS_S)
        await asyncio.to_thread(engine.in_step.wait, LIVENESS_S)
        queued = loop.call(lambda e: e.add("late"))
        loop.stop(timeout_s=0.01)  # the step is still held: the thread outlives the join
        engine.gate.set()
        with pytest.raises(EngineLoopStopped):
            await asyncio.wait_for(queued, LIVENESS_S)
        assert "late" not in engine.requests

    asyncio.run(main())
