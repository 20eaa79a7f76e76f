"""Test fakes for the fault tests, built on the production deployment classes (pickled by
value into the replicas: they cannot import tests/).

- ``StalledPullReceiver``: the real object-store receiver, except that the pull of a prompt of
  exactly ``STALL_PROMPT_TOKENS`` tokens never completes -- its objects never become local, as
  when a fetch across nodes stalls. Everything else (destinations, completion records, leases,
  release) is the real receiver's.
- ``StalledPullDecodeServer``: the real DecodeServer with that receiver in place of its
  object-store receiver; ``stalled_pulls`` reports how many pulls it stalled and holds now.
- ``LeasePuller``: a decode replica reduced to its object-store receiver, in a named actor of
  its own (so that a test can kill the puller of a published lease).
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


class LeasePuller:
    """Stand-in for a decode replica (a named Ray actor: ``ray.remote`` it with a name): the
    real object-store receiver, whose destinations carry this actor as their owner."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        import torch

        from disagg.kv.layout import KVLayout
        from disagg.kv.paged_cache import PagedKVCache
        from disagg.transport.ray_object_store import RayObjectStoreKVReceiver, actor_owner

        self.receiver = RayObjectStoreKVReceiver(owner=actor_owner())
        self.receiver.attach(PagedKVCache(KVLayout(num_layers, num_kv_heads, head_dim,
                                                   torch.float32), 16, 4))

    def destination(self, request_id: str, runs, num_prompt_tokens: int, ttl_s: float) -> list:
        return self.receiver.destination(request_id, runs, num_prompt_tokens,
                                         ttl_s=ttl_s).to_list()

    def pull(self, completion, deadline_s: float) -> str:
        """Take the completion record and copy its KV in: the pull's final status."""
        import time

        self.receiver.complete(completion)
        end = time.monotonic() + deadline_s
        while not (result := self.receiver.poll(completion.request_id)).status.finished:
            if time.monotonic() > end:
                return "hung"
            time.sleep(0.01)
        self.receiver.release(completion.request_id)
        return result.status.value
