"""Test fakes for the hand-off tests, built on the production deployment classes.

- ``SlowPrefillServer``: the real PrefillServer with every sender wrapped so that each layer's
  write and the final confirmation take a configurable time (a long prompt over a slow link,
  on a 2-core machine). The engine, the writers and the Serve calls are the real thing.
- ``KVDigestDecodeServer``: the real DecodeServer, recording a digest of each disaggregated
  request's prompt KV as it sits in its pool once decoding has started.
"""

from __future__ import annotations

import hashlib
import time

import torch

from deployments.decode_server import DecodeServer
from deployments.prefill_server import PrefillServer


class SlowWriter:
    """Delegates to a real writer, sleeping before each layer and before ``finish``."""

    def __init__(self, writer, layer_delay_s: float, finish_delay_s: float):
        self._writer = writer
        self._layer_delay_s = layer_delay_s
        self._finish_delay_s = finish_delay_s
        self._aborted = False
        self.destination = writer.destination

    def write_layer(self, layer, k, v):
        time.sleep(self._layer_delay_s)
        self._writer.write_layer(layer, k, v)

    def finish(self, header):
        end = time.monotonic() + self._finish_delay_s
        while time.monotonic() < end and not self._aborted:
            time.sleep(0.05)
        return self._writer.finish(header)

    def abort(self):
        self._aborted = True
        self._writer.abort()


class SlowSender:
    def __init__(self, sender, layer_delay_s: float, finish_delay_s: float):
        self._sender = sender
        self.backend = sender.backend
        self._delays = (layer_delay_s, finish_delay_s)

    def accepts(self, destination):
        return self._sender.accepts(destination)

    def open(self, destination, *, num_layers):
        return SlowWriter(self._sender.open(destination, num_layers=num_layers), *self._delays)

    def leased(self):
        return self._sender.leased()

    def close(self):
        self._sender.close()


class SlowPrefillServer(PrefillServer.func_or_class):
    """The real PrefillServer; its KV writes take ``layer_delay_s`` per layer and
    ``finish_delay_s`` more to be confirmed."""

    def __init__(self, config, layer_delay_s: float, finish_delay_s: float):
        super().__init__(config)
        self.engine.senders = {name: SlowSender(s, layer_delay_s, finish_delay_s)
                               for name, s in self.engine.senders.items()}


def kv_digest(packed) -> str:
    h = hashlib.sha256()
    for t in (*packed.k, *packed.v):
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class KVDigestDecodeServer(DecodeServer.func_or_class):
    async def __init__(self, config, prefill):
        await super().__init__(config, prefill)
        self.last_digest = None

    async def _run_disaggregated(self, request):
        rid, n = request.request_id, request.num_prompt_tokens
        count = 0
        async for item in super()._run_disaggregated(request):
            count += 1
            if count == 2:  # token 1: the KV is in place and the request still holds it
                self.last_digest = await self._loop.call(
                    lambda e: kv_digest(e.cache.read_packed(e.block_table(rid), n)))
            yield item

    async def digest(self) -> str | None:
        return self.last_digest


class OtherModelPrefillServer(PrefillServer.func_or_class):
    """The real PrefillServer, believing it serves another model: the KV it produces carries
    that model's name in its fingerprint (a misrouted or misconfigured prefill replica)."""

    def __init__(self, config):
        super().__init__(config)
        self.engine.model_name = "some-other-model"
