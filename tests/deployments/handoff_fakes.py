"""Test fakes for the hand-off tests: the real PrefillServer with its KV writes slowed down.

``SlowPrefillServer`` is the production deployment class with every sender wrapped so that
each layer's write and the final confirmation take a configurable time (a long prompt over a
slow link, on a 2-core machine). Everything else -- the engine, the writers, the Serve calls --
is the real thing.
"""

from __future__ import annotations

import time

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
