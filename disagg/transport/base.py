"""The KV hand-off contract: decode names a destination, prefill pushes KV there layer by layer.

Life of one hand-off (every backend):
1. Decode reserves the request's blocks *first*, then each of its receivers names a
   destination: the backend, this replica's endpoint and node, the reserved rows as runs
   ``(slot_start, token_start, num_tokens)``, and an expiry time. The offers travel with the
   prefill request (msgpack, never pickle), in decode's order of preference (same GPU / node
   first, the object store last).
2. Prefill takes the first offer one of its senders ``accepts`` and ``open``s a ``KVWriter``. After each layer is computed the model
   calls ``write_layer``; the writer moves that layer's K/V towards the destination while the
   remaining layers run (ordered after the layer's work on the device). Token 0 is sampled and
   returned without waiting for any of it.
3. ``KVWriter.finish`` waits until every layer's write is complete and returns the
   ``KVCompletion`` record (fingerprint, token 0, bytes, timings). A writer never writes after
   the destination's expiry, nor after ``abort``.
4. Decode hands the record to ``KVReceiver.complete`` and ``poll``s it from its step loop (never
   blocking): DONE only when every layer is confirmed in the reserved rows; FAILED / EXPIRED /
   ABORTED otherwise. KV without a completion record is never decoded.
5. ``KVReceiver.release`` forgets the destination. The decode side frees the rows only once no
   writer can still touch them: the prefill call has ended, or the destination has expired.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import torch

from disagg.kv.layout import KVFingerprint

Run = tuple[int, int, int]  # (slot_start, token_start, num_tokens)


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
    """What produced the KV of one request (msgpack on the wire)."""

    request_id: str
    fingerprint: KVFingerprint
    first_token_id: int

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "fingerprint": self.fingerprint.to_dict(),
                "first_token_id": self.first_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> KVHeader:
        return cls(d["request_id"], KVFingerprint.from_dict(d["fingerprint"]), d["first_token_id"])

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> KVHeader:
        return cls.from_dict(msgpack.unpackb(data))


@dataclass(frozen=True)
class KVDestination:
    """Where one request's prompt KV must be written: decode's reserved rows.

    ``runs`` cover positions ``0 .. num_prompt_tokens - 1`` in order; ``endpoint`` is the
    backend's name of the decode replica's pool (an export id, a rendezvous address);
    ``node`` the decode replica's node ("" when unknown); ``expires_at`` is wall-clock
    (``time.time``): no write may start after it. ``owner`` names the receiving process for
    backends whose sender holds resources until decode takes them (the object store's lease:
    the decode replica's Ray actor, ``namespace/name``); what is held for it ends once that
    process is gone ("": unknown, held resources end at their own expiry).
    """

    request_id: str
    backend: str
    endpoint: str
    runs: tuple[Run, ...]
    num_prompt_tokens: int
    expires_at: float
    node: str = ""
    transfer_id: int = 0  # the receiver's number for this destination (backends that need one)
    owner: str = ""

    def to_list(self) -> list:
        return [self.request_id, self.backend, self.endpoint, [list(r) for r in self.runs],
                self.num_prompt_tokens, self.expires_at, self.node, self.transfer_id,
                self.owner]

    @classmethod
    def from_list(cls, d: list) -> KVDestination:
        rid, backend, endpoint, runs, n, expires_at, node, transfer_id, owner = d
        return cls(rid, backend, endpoint, tuple(tuple(r) for r in runs), n, expires_at, node,
                   transfer_id, owner)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def encode_offers(offers: tuple[KVDestination, ...]) -> bytes:
    """A request's destinations, in decode's order of preference, as msgpack."""
    return msgpack.packb([d.to_list() for d in offers])


def decode_offers(data: bytes) -> tuple[KVDestination, ...]:
    return tuple(KVDestination.from_list(d) for d in msgpack.unpackb(data))


@dataclass(frozen=True)
class KVCompletion:
    """Prefill's record that every layer of a request's KV was written (or published).

    ``payload`` is the backend's own locator of published data (the object store's refs);
    None for backends that wrote in place.
    """

    header: KVHeader
    backend: str
    num_bytes: int
    num_layers: int
    write_wait_s: float  # from the last layer's compute until every write was confirmed
    payload: Any = field(default=None, repr=False)

    @property
    def request_id(self) -> str:
        return self.header.request_id


@dataclass(frozen=True)
class ReceiveResult:
    """Outcome of polling one hand-off."""

    status: TransferStatus
    error: str | None = None


class KVTransferAborted(Exception):
    """The writer was aborted (cancelled request) or its destination expired."""


class KVWriter(Protocol):
    """Prefill side, one per request: takes each layer's K/V as soon as it is computed."""

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start moving ``k``, ``v`` ``[N, Hkv, D]`` of ``layer`` to the destination; the
        tensors may be reused by the caller once the device work queued so far has run."""
        ...

    def finish(self, header: KVHeader) -> KVCompletion:
        """Block until every layer's write is complete; raise on failure or expiry."""
        ...

    def abort(self) -> None:
        """Stop: no further write starts; resources of this request are freed."""
        ...


class KVSender(Protocol):
    """Prefill side, one per engine and backend."""

    backend: str

    def accepts(self, destination: KVDestination) -> bool:
        """Whether this sender can write to ``destination`` from here (same node, mapped...)."""
        ...

    def open(self, destination: KVDestination, *, num_layers: int) -> KVWriter: ...

    def leased(self) -> tuple[int, int]:
        """(leases held, their bytes): KV published and not yet copied by decode."""
        ...

    def close(self) -> None: ...


class KVReceiver(Protocol):
    """Decode side, one per engine and backend; its cache is attached once at start."""

    backend: str

    def attach(self, cache) -> None:
        """Bind the decode engine's ``PagedKVCache`` (exported or registered once)."""
        ...

    def destination(self, request_id: str, runs: tuple[Run, ...], num_prompt_tokens: int,
                    *, ttl_s: float) -> KVDestination: ...

    def complete(self, completion: KVCompletion) -> None:
        """Prefill reports the KV complete: finish receiving (poll says when it is usable)."""
        ...

    def poll(self, request_id: str) -> ReceiveResult: ...

    def release(self, request_id: str) -> None:
        """Forget the request's destination (idempotent)."""
        ...

    def close(self) -> None: ...
