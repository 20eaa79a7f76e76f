"""The decode engine's receivers, one per backend, offered to prefill in order of preference.

A request's KV can arrive by whichever backend the prefill replica that takes it can reach:
decode offers one destination per receiver (same GPU / same node first -- ``cuda_ipc`` --,
then across nodes -- ``nccl`` --, the object store last), the prefill side takes the first it
accepts, and its completion record names the backend used. This set routes ``complete`` and
``poll`` to that backend's receiver and releases a request on all of them.
"""

from __future__ import annotations

from disagg.transport.base import (
    KVCompletion,
    KVDestination,
    KVReceiver,
    ReceiveResult,
    Run,
    TransferStatus,
)


class ReceiverSet:
    """Several ``KVReceiver``s behind one face; ``destinations`` gives the offers."""

    def __init__(self, receivers: tuple[KVReceiver, ...]):
        if not receivers:
            raise ValueError("a receiver set needs at least one receiver")
        backends = [r.backend for r in receivers]
        if len(set(backends)) != len(backends):
            raise ValueError(f"one receiver per backend, got {backends}")
        self.receivers = {r.backend: r for r in receivers}
        self._used: dict[str, str] = {}  # request id -> backend of its completion

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.receivers)

    def attach(self, cache) -> None:
        for r in self.receivers.values():
            r.attach(cache)

    def destinations(self, request_id: str, runs: tuple[Run, ...], num_prompt_tokens: int,
                     *, ttl_s: float) -> tuple[KVDestination, ...]:
        return tuple(r.destination(request_id, runs, num_prompt_tokens, ttl_s=ttl_s)
                     for r in self.receivers.values())

    def complete(self, completion: KVCompletion) -> None:
        receiver = self.receivers.get(completion.backend)
        if receiver is None:
            raise ValueError(f"KV completed through {completion.backend!r}, which this decode "
                             f"engine never offered ({list(self.receivers)})")
        self._used[completion.request_id] = completion.backend
        receiver.complete(completion)

    def poll(self, request_id: str) -> ReceiveResult:
        backend = self._used.get(request_id)
        if backend is None:
            return ReceiveResult(TransferStatus.PENDING)
        return self.receivers[backend].poll(request_id)

    def release(self, request_id: str) -> None:
        self._used.pop(request_id, None)
        for r in self.receivers.values():
            r.release(request_id)

    def close(self) -> None:
        for r in self.receivers.values():
            r.close()
