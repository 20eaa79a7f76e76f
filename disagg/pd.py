"""Prefill and decode engines in one process, joined by the in-process KV transport.

This is the disaggregated path without a network: the CLI's ``--disaggregated`` and the tests
use it; the Ray Serve deployments run the same two engines in separate processes.

Life of a request here:
1. ROUTED: ``DecodeEngine.add_remote_request`` reserves the prompt's blocks.
2. PREFILLING: ``PrefillEngine.prefill_and_publish`` runs the prompt; token 0 is yielded at
   once (the client's first token), and the KV waits under a lease.
3. If token 0 ends the request, no lease was taken; decode drops its reservation.
4. KV_TRANSFERRING: ``DecodeEngine.kv_ready`` checks the fingerprint and starts the pull.
5. DECODING: decode steps yield tokens 1.. until the request finishes.
Closing the iterator early (a stop string, a client gone) aborts the request on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator

from disagg.decode.engine import DecodeEngine
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SampledToken


class InProcessDisaggregated:
    """One prefill engine and one decode engine; requests are served one after another."""

    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine,
                 eos_token_ids: tuple[int, ...] = ()):
        self.prefill = prefill
        self.decode = decode
        self.eos_token_ids = eos_token_ids

    def generate(self, request: EngineRequest) -> Iterator[SampledToken]:
        rid = request.request_id
        self.decode.add_remote_request(request)
        finished = False
        try:
            published = self.prefill.prefill_and_publish(request, self.eos_token_ids)
            yield published.first_token
            if published.handle is None:
                return
            self.decode.kv_ready(rid, published.handle, published.first_token,
                                 published.fingerprint)
            while not finished:
                for out in self.decode.step():
                    if out.request_id != rid:
                        continue
                    if out.token is not None:
                        yield out.token
                    if out.finished:
                        finished = True
                        if out.error is not None:
                            raise out.error
        finally:
            if not finished:
                self.decode.abort(rid)
                if self.prefill.sender is not None:
                    self.prefill.sender.release(rid)
