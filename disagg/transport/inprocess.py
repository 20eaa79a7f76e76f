"""In-process KV transport: prefill and decode engines in one process (CLI, tests).

The sender keeps published KV in a dictionary under leases; the receiver pulls from that same
object. The header still goes through msgpack so this backend exercises the wire format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from disagg.kv.layout import PackedKV
from disagg.transport.base import KVHandle, KVHeader, ReceiveResult, TransferStatus

BACKEND = "inprocess"


@dataclass
class _Lease:
    header: bytes
    kv: PackedKV
    expires_at: float


class InProcessKVSender:
    """Holds published KV until it is pulled, released or its lease expires."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._leases: dict[str, _Lease] = {}

    def publish(self, header: KVHeader, kv: PackedKV, *, lease_s: float) -> KVHandle:
        if header.request_id in self._leases:
            raise ValueError(f"request {header.request_id!r} already has a lease")
        self._leases[header.request_id] = _Lease(header.encode(), kv, self._clock() + lease_s)
        return KVHandle(header.request_id, BACKEND, kv.num_bytes)

    def take(self, request_id: str) -> _Lease | None:
        """Hand a lease's contents to the puller and free the lease."""
        self.expire()
        return self._leases.pop(request_id, None)

    def release(self, request_id: str) -> None:
        self._leases.pop(request_id, None)

    def expire(self) -> list[str]:
        now = self._clock()
        expired = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        for rid in expired:
            del self._leases[rid]
        return expired

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def leased_bytes(self) -> int:
        return sum(lease.kv.num_bytes for lease in self._leases.values())


class InProcessKVReceiver:
    """Pulls from an ``InProcessKVSender``; a pull completes on its first poll."""

    def __init__(self, sender: InProcessKVSender, clock: Callable[[], float] = time.monotonic):
        self._sender = sender
        self._clock = clock
        self._pending: dict[str, tuple[KVHandle, float]] = {}

    def start(self, handle: KVHandle, *, timeout_s: float) -> None:
        if handle.backend != BACKEND:
            raise ValueError(f"handle of backend {handle.backend!r} given to {BACKEND!r}")
        self._pending[handle.request_id] = (handle, self._clock() + timeout_s)

    def poll(self, request_id: str) -> ReceiveResult:
        if request_id not in self._pending:
            return ReceiveResult(TransferStatus.ABORTED, error="no pull in progress")
        _, deadline = self._pending[request_id]
        if self._clock() > deadline:
            del self._pending[request_id]
            self._sender.release(request_id)
            return ReceiveResult(TransferStatus.EXPIRED, error="KV pull deadline passed")
        del self._pending[request_id]
        lease = self._sender.take(request_id)
        if lease is None:
            return ReceiveResult(TransferStatus.FAILED,
                                 error="the prefill side holds no KV for this request "
                                       "(lease expired or released)")
        return ReceiveResult(TransferStatus.DONE, KVHeader.decode(lease.header), lease.kv)

    def abort(self, request_id: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self._sender.release(request_id)
