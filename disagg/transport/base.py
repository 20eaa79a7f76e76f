"""The KV hand-off contract between the prefill side and the decode side.

Life of one hand-off:
1. Prefill finishes a prompt and ``KVSender.publish``es its ``PackedKV`` with a ``KVHeader``
   under a lease; it gets a ``KVHandle`` (small, picklable) that travels with the request.
2. Decode, once it has the request's blocks reserved, ``KVReceiver.start``s a pull with a
   deadline and ``poll``s it from its step loop (never blocks the loop).
3. The pull ends DONE (header + KV delivered; the lease is released at once), FAILED (lease
   gone, header unreadable), ABORTED (decode gave up, lease released) or EXPIRED (deadline).
The sender frees every lease on pull, on abort, or when it expires: nothing outlives them.
Headers travel as msgpack, never pickle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from disagg.kv.layout import KVFingerprint, PackedKV


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self is not TransferStatus.PENDING


@dataclass(frozen=True)
class KVHeader:
    """Metadata sent ahead of the tensors (msgpack on the wire)."""

    request_id: str
    fingerprint: KVFingerprint
    first_token_id: int

    def encode(self) -> bytes:
        return msgpack.packb({"request_id": self.request_id,
                              "fingerprint": self.fingerprint.to_dict(),
                              "first_token_id": self.first_token_id})

    @classmethod
    def decode(cls, data: bytes) -> KVHeader:
        d = msgpack.unpackb(data)
        return cls(d["request_id"], KVFingerprint.from_dict(d["fingerprint"]), d["first_token_id"])


@dataclass(frozen=True)
class KVHandle:
    """Where a published KV can be pulled from; ``ref`` is the backend's own locator."""

    request_id: str
    backend: str
    num_bytes: int
    ref: Any = None


@dataclass(frozen=True)
class ReceiveResult:
    """Outcome of polling one pull."""

    status: TransferStatus
    header: KVHeader | None = None
    kv: PackedKV | None = field(default=None, repr=False)
    error: str | None = None


class KVSender(Protocol):
    """Prefill side: holds published KV under leases until pulled, aborted or expired."""

    def publish(self, header: KVHeader, kv: PackedKV, *, lease_s: float) -> KVHandle: ...

    def release(self, request_id: str) -> None:
        """Drop a lease early (the request ended at its first token, or was aborted)."""
        ...

    def expire(self) -> list[str]:
        """Free leases past their expiry; returns their request ids."""
        ...

    @property
    def num_leases(self) -> int: ...

    @property
    def leased_bytes(self) -> int: ...


class KVReceiver(Protocol):
    """Decode side: pulls published KV, polled from the engine loop."""

    def start(self, handle: KVHandle, *, timeout_s: float) -> None: ...

    def poll(self, request_id: str) -> ReceiveResult: ...

    def abort(self, request_id: str) -> None: ...
