"""Waits of the hand-off that had no deadline of their own (issue 17's audit): a prefill that
never sends token 0, and one that sends its last event and never ends its stream. Each fails
with a typed error (``KVTransferError``) at its deadline, the prefill call is closed (its
worker is cancelled), and the request's blocks return to the pool. A real decode engine on its
loop thread; the prefill clients are test fakes."""

from __future__ import annotations

import asyncio

import pytest
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.loop_client import DecodeLoopClient
from disagg.disaggregated import FirstToken, HandoffConfig, HandoffTiming, serve_disaggregated
from disagg.engine_loop import EngineLoop
from disagg.errors import KVTransferError
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver

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
