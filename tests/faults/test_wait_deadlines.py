"""Waits of the hand-off that had no deadline of their own (issue 17's audit): a prefill that
never sends token 0, and one that sends its last event and never ends its stream. Each fails
with a typed error (``KVTransferError``) at its deadline, the prefill call is closed (its
worker is cancelled), and the request's blocks return to the pool. And a request cancelled
after token 0 while its completion record is on the way: the record is still taken and given
to the engine, which frees what it holds at once (the object store's lease; the rows' fence)
instead of at the lease's expiry. A real decode engine on its loop thread; the prefill
clients are test fakes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.loop_client import DecodeLoopClient
from disagg.disaggregated import FirstToken, HandoffConfig, HandoffTiming, serve_disaggregated
from disagg.engine_loop import EngineLoop
from disagg.errors import KVTransferError
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.worker import LocalPrefillClient
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver, DirectKVSender

PROMPT = tuple(range(10, 60))
LIVENESS_S = 30.0


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=3)[0]


class HangingPrefill:
    """Test fake prefill client: ``mode`` "before_token0" never yields anything; "after_end"
    yields token 0 ending the request (max_tokens 1) and then never ends its stream."""

    def __init__(self, model, mode: str):
        self.engine = PrefillEngine(model, model_name="tiny")
        self.mode, self.closed = mode, False

    async def prefill(self, request, offers):
        try:
            if self.mode == "after_end":
                result = self.engine.prefill(request)
                yield FirstToken(result.first_token, "length", 0.0, result.prefill_s)
            await asyncio.sleep(3600)
        finally:
            self.closed = True


def _run(model, prefill, config: HandoffConfig, max_tokens: int):
    async def main():
        engine = DecodeEngine(model, DecodeConfig(block_size=4, num_blocks=64),
                              model_name="tiny", receivers=(DirectKVReceiver(),))
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            request = EngineRequest("r", PROMPT, SamplingParams(temperature=0.0), max_tokens, 7)
            error = None
            try:
                async with asyncio.timeout(LIVENESS_S):
                    async for _ in serve_disaggregated(request, prefill, DecodeLoopClient(loop),
                                                       HandoffTiming(), config):
                        pass
            except KVTransferError as e:
                error = e
            end = asyncio.get_running_loop().time() + LIVENESS_S
            while True:  # the blocks come back (after the cancelled writer's grace at most)
                free, total = await loop.call(lambda e: (e.num_free_blocks, e.num_total_blocks))
                if free == total or asyncio.get_running_loop().time() > end:
                    return error, total - free
                await asyncio.sleep(0.05)
        finally:
            loop.stop()

    return asyncio.run(main())


def test_no_token_0_from_prefill_fails_at_the_deadline(model):
    prefill = HangingPrefill(model, "before_token0")
    config = HandoffConfig(first_token_timeout_s=0.5, cancel_grace_s=0.1)
    error, held = _run(model, prefill, config, max_tokens=4)
    assert error is not None and "no token 0" in str(error)
    assert prefill.closed and held == 0


def test_a_prefill_stream_that_never_ends_fails_at_the_deadline(model):
    prefill = HangingPrefill(model, "after_end")
    config = HandoffConfig(kv_complete_timeout_s=0.5, cancel_grace_s=0.1)
    error, held = _run(model, prefill, config, max_tokens=1)
    assert error is not None and "did not end" in str(error)
    assert prefill.closed and held == 0


class SlowCompletionPrefill:
    """Test fake: the real in-process prefill (token 0, then the completion record), the
    record held back until ``release`` is set."""

    def __init__(self, model):
        self.client = LocalPrefillClient(PrefillEngine(model, model_name="tiny",
                                                       senders=(DirectKVSender(),)))
        self.release = asyncio.Event()

    async def prefill(self, request, offers):
        events = self.client.prefill(request, offers)
        yield await anext(events)
        await self.release.wait()
        async for event in events:
            yield event


class RecordingDecode:
    """The real DecodeLoopClient, recording the completion records it is given."""

    def __init__(self, client: DecodeLoopClient):
        self._client, self.completed = client, []

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def kv_complete(self, request_id, first_token, completion):
        self.completed.append(request_id)
        await self._client.kv_complete(request_id, first_token, completion)


def test_a_record_arriving_after_the_request_was_cancelled_is_freed_at_once(model):
    async def main():
        engine = DecodeEngine(model, DecodeConfig(block_size=4, num_blocks=64),
                              model_name="tiny", receivers=(DirectKVReceiver(),))
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        prefill = SlowCompletionPrefill(model)
        try:
            decode = RecordingDecode(DecodeLoopClient(loop))
            request = EngineRequest("r", PROMPT, SamplingParams(temperature=0.0), 4, 7)
            # A fence grace far past the wait below: freed by the record, not by the grace.
            config = HandoffConfig(cancel_grace_s=10 * LIVENESS_S)
            token0 = asyncio.Event()

            async def consume():
                async for _ in serve_disaggregated(request, prefill, decode, HandoffTiming(),
                                                   config):
                    token0.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(token0.wait(), LIVENESS_S)
            await asyncio.sleep(0.1)  # now waiting for the completion record
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            prefill.release.set()  # the record arrives after the request ended
            end = asyncio.get_running_loop().time() + LIVENESS_S
            while True:
                free, total = await loop.call(lambda e: (e.num_free_blocks, e.num_total_blocks))
                if free == total:
                    break
                assert asyncio.get_running_loop().time() < end, f"{total - free} blocks held"
                await asyncio.sleep(0.05)
            assert decode.completed == ["r"]
        finally:
            loop.stop()
            prefill.client.close()

    asyncio.run(main())
