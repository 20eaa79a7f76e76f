"""Prefill and decode engines in one process, joined by the ``inprocess`` KV backend.

This is the disaggregated path without a network: the CLI's ``--disaggregated`` and the tests
use it. It runs the same request life as the Serve app (``disagg/disaggregated.py``): decode
reserves the blocks and offers a destination, prefill (on its own worker thread) writes each
layer's KV straight into decode's pool and returns token 0, decode (on its engine-loop
thread) checks the completion record and decodes. Requests are served one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.loop_client import DecodeLoopClient
from disagg.disaggregated import HandoffTiming, serve_disaggregated
from disagg.engine_loop import EngineLoop
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.worker import LocalPrefillClient
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.direct import DirectKVReceiver, DirectKVSender


class InProcessDisaggregated:
    """One prefill engine and one decode engine; ``close`` stops their threads."""

    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine,
                 eos_token_ids: tuple[int, ...] = ()):
        self.prefill = prefill
        self.decode = decode
        self._aio = asyncio.new_event_loop()
        self._decode_loop = EngineLoop(decode, self._aio)
        self._decode_loop.start()
        self._prefill_client = LocalPrefillClient(prefill, eos_token_ids)
        self._decode_client = DecodeLoopClient(self._decode_loop)
        self.last_timing: HandoffTiming | None = None

    @classmethod
    def build(cls, model, *, model_name: str, trianglemix=None,
              decode_config: DecodeConfig | None = None, eos_token_ids: tuple[int, ...] = ()
              ) -> InProcessDisaggregated:
        prefill = PrefillEngine(model, model_name=model_name, trianglemix=trianglemix,
                                senders=(DirectKVSender(),))
        decode = DecodeEngine(model, decode_config or DecodeConfig(), model_name=model_name,
                              receivers=(DirectKVReceiver(),))
        return cls(prefill, decode, eos_token_ids)

    def generate(self, request: EngineRequest) -> Iterator[SampledToken]:
        """Token 0 (sampled by prefill), then decode's tokens; closing the iterator early (a
        stop string, a caller gone) ends the request on both sides."""
        self.last_timing = timing = HandoffTiming()
        tokens = serve_disaggregated(request, self._prefill_client, self._decode_client, timing)
        try:
            while True:
                try:
                    out = self._aio.run_until_complete(anext(tokens))
                except StopAsyncIteration:
                    return
                if out.token is not None:
                    yield out.token
                if out.error is not None:
                    raise out.error
        finally:
            self._aio.run_until_complete(tokens.aclose())

    def run_on_engine(self, fn):
        """Run ``fn(decode_engine)`` between its steps (inspection in tests)."""
        return self._aio.run_until_complete(self._decode_loop.call(fn))

    def close(self) -> None:
        self._decode_loop.stop()
        self._prefill_client.close()
        self._aio.close()
