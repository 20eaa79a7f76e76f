"""Test fakes for the fault tests, built on the production deployment classes (pickled by
value into the replicas: they cannot import tests/).

- ``StalledPullReceiver``: the real object-store receiver, except that the pull of a prompt of
  exactly ``STALL_PROMPT_TOKENS`` tokens never completes -- its objects never become local, as
  when a fetch across nodes stalls. Everything else (destinations, completion records, leases,
  release) is the real receiver's.
- ``StalledPullDecodeServer``: the real DecodeServer with that receiver in place of its
  object-store receiver; ``stalled_pulls`` reports how many pulls it stalled and holds now.
"""

from __future__ import annotations

from deployments.decode_server import DecodeServer
from disagg.transport.base import ReceiveResult, TransferStatus
from disagg.transport.ray_object_store import BACKEND as OBJECT_STORE

STALL_PROMPT_TOKENS = 333


class StalledPullReceiver:
    def __init__(self, receiver):
        self._receiver = receiver
        self.backend = receiver.backend
        self.endpoint = receiver.endpoint
        self._stalled: set[str] = set()
        self.num_stalled = 0

    def attach(self, cache) -> None:
        self._receiver.attach(cache)

    def destination(self, request_id, runs, num_prompt_tokens, *, ttl_s):
        if num_prompt_tokens == STALL_PROMPT_TOKENS:
            self._stalled.add(request_id)
        return self._receiver.destination(request_id, runs, num_prompt_tokens, ttl_s=ttl_s)

    def complete(self, completion) -> None:
        if completion.request_id in self._stalled:
            self.num_stalled += 1
        self._receiver.complete(completion)  # the real one holds the record and its lease

    def poll(self, request_id: str) -> ReceiveResult:
        if request_id in self._stalled:  # its objects never arrive on this node
            return ReceiveResult(TransferStatus.PENDING)
        return self._receiver.poll(request_id)

    def release(self, request_id: str) -> None:
        self._stalled.discard(request_id)
        self._receiver.release(request_id)

    def close(self) -> None:
        self._receiver.close()


class StalledPullDecodeServer(DecodeServer.func_or_class):
    async def __init__(self, config, prefill):
        await super().__init__(config, prefill)
        receivers = self._loop.engine.receivers.receivers  # no request is in flight yet
        self._stall = receivers[OBJECT_STORE] = StalledPullReceiver(receivers[OBJECT_STORE])

    async def stalled_pulls(self) -> tuple[int, int]:
        """(pulls stalled so far, stalled pulls still held)."""
        return await self._loop.call(lambda _: (self._stall.num_stalled,
                                                len(self._stall._stalled)))
