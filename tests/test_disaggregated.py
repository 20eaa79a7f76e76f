"""The life of a disaggregated request (``serve_disaggregated``) against a real decode engine
on its loop thread, with test-fake prefill clients that fail in the ways real ones do."""

from __future__ import annotations

import asyncio

import pytest
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.loop_client import DecodeLoopClient
from disagg.disaggregated import (
    FirstToken,
    HandoffConfig,
    HandoffTiming,
    serve_disaggregated,
)
from disagg.engine_loop import EngineLoop
from disagg.errors import KVTransferError
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver

PROMPT = tuple(range(10, 60))


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=3)[0]


class FailingPrefill:
    """Test fake prefill client: the real token 0, then the hand-off fails (``mode``)."""

    def __init__(self, model, mode: str):
        self.engine = PrefillEngine(model, model_name="tiny")
        self.mode = mode
        self.closed = False

    async def prefill(self, request, offers):
        assert offers and offers[0].backend == "inprocess"  # blocks were reserved first
        result = self.engine.prefill(request)
        try:
            yield FirstToken(result.first_token, None, 0.0, result.prefill_s)
            if self.mode == "lost":
                raise KVTransferError("the prefill replica was lost before its KV was complete")
            await asyncio.sleep(3600)  # "silent": the completion never comes
        finally:
            self.closed = True


def run(model, prefill, config: HandoffConfig, params: SamplingParams):
    async def main():
        engine = DecodeEngine(model, DecodeConfig(block_size=4, num_blocks=64),
                              model_name="tiny", receivers=(DirectKVReceiver(),))
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            client = DecodeLoopClient(loop)
            request = EngineRequest("r", PROMPT, params, 10, 7)
            timing = HandoffTiming()
            tokens = []
            try:
                async for out in serve_disaggregated(request, prefill, client, timing, config):
                    if out.token is not None:
                        tokens.append(out.token.token_id)
            finally:
                held = await _settled(loop)
            local = DecodeLoopClient(loop)
            await local.add_local(EngineRequest("ref", PROMPT, params, 10, 7))
            reference = [o.token.token_id async for o in local.outputs("ref") if o.token]
            return tokens, reference, timing, held
        finally:
            loop.stop()

    return asyncio.run(main())


async def _settled(loop: EngineLoop, deadline_s: float = 10.0):
    """Blocks held once the engine has nothing left (liveness deadline)."""
    end = asyncio.get_running_loop().time() + deadline_s
    while True:
        free, total, busy = await loop.call(
            lambda e: (e.num_free_blocks, e.num_total_blocks, e.has_unfinished()))
        if not busy or asyncio.get_running_loop().time() > end:
            return total - free
        await asyncio.sleep(0.02)


GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, ignore_eos=True)


@pytest.mark.parametrize("mode", ["lost", "silent"])
def test_a_failed_hand_off_after_token_0_is_a_clear_error(model, mode):
    prefill = FailingPrefill(model, mode)
    config = HandoffConfig(kv_complete_timeout_s=0.5, cancel_grace_s=0.1)
    with pytest.raises(KVTransferError, match="lost" if mode == "lost" else "within 0.5 s"):
        run(model, prefill, config, GREEDY)
    assert prefill.closed


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("mode", ["lost", "silent"])
def test_local_prefill_policy_recomputes_and_goes_on_as_the_local_path(model, mode, params):
    prefill = FailingPrefill(model, mode)
    config = HandoffConfig(kv_complete_timeout_s=0.5, cancel_grace_s=0.1,
                           on_kv_failure="local_prefill")
    tokens, reference, timing, held = run(model, prefill, config, params)
    assert tokens == reference and len(tokens) == 10  # token 0 counted once, seeds keyed
    assert timing.kv_recomputed and timing.backend is None
    assert held == 0 and prefill.closed
