"""KV transport through the Ray object store: works on CPU and across nodes (the baseline).

The prefill replica ``ray.put``s a request's KV (msgpack header + one numpy array per layer
for K and V; 16-bit dtypes travel as int16 views, since numpy has no bfloat16). The lease is
held by a small ``LeaseKeeper`` actor that the sender creates (it shares the prefill
process's fate): it keeps the object alive until the decode side releases it after the pull,
or until the lease expires. The ``KVHandle`` carries the object ref and the keeper's actor
handle, so the decode replica releases exactly the lease it pulled, wherever it lives.
Decode polls ``ray.wait`` (which fetches the object to its node) and reads the arrays
zero-copy, then copies them into its blocks.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import torch

from disagg.kv.layout import PackedKV
from disagg.transport.base import KVHandle, KVHeader, ReceiveResult, TransferStatus

BACKEND = "ray-object-store"
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # Arrays from the object store are read-only views; decode only copies out of them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a).view(dtype)


@ray.remote(num_cpus=0)
class LeaseKeeper:
    """Holds published KV objects under leases (refs wrapped in lists: never dereferenced)."""

    def __init__(self):
        self._leases: dict[str, tuple[list, int, float]] = {}

    def hold(self, request_id: str, refs: list, num_bytes: int, lease_s: float) -> None:
        self._leases[request_id] = (refs, num_bytes, time.monotonic() + lease_s)

    def release(self, request_id: str) -> bool:
        return self._leases.pop(request_id, None) is not None

    def expire(self) -> list[str]:
        now = time.monotonic()
        expired = [rid for rid, (_, _, t) in self._leases.items() if t <= now]
        for rid in expired:
            del self._leases[rid]
        return expired

    def stats(self) -> tuple[int, int]:
        self.expire()
        return len(self._leases), sum(b for _, b, _ in self._leases.values())


@dataclass(frozen=True)
class RayKVRef:
    """The Ray backend's locator: the object (in a list, so Ray passes it by reference) and
    the keeper that holds its lease."""

    refs: list
    keeper: ray.actor.ActorHandle


class RayObjectStoreKVSender:
    """Prefill side. Blocking calls: use it from a worker thread, not an event loop."""

    def __init__(self):
        self._keeper = LeaseKeeper.remote()

    def publish(self, header: KVHeader, kv: PackedKV, *, lease_s: float) -> KVHandle:
        payload = (header.encode(), [_to_numpy(t) for t in kv.k], [_to_numpy(t) for t in kv.v])
        ref = ray.put(payload)
        ray.get(self._keeper.hold.remote(header.request_id, [ref], kv.num_bytes, lease_s))
        return KVHandle(header.request_id, BACKEND, kv.num_bytes, RayKVRef([ref], self._keeper))

    def release(self, request_id: str) -> None:
        self._keeper.release.remote(request_id)

    def expire(self) -> list[str]:
        return ray.get(self._keeper.expire.remote())

    @property
    def num_leases(self) -> int:
        return ray.get(self._keeper.stats.remote())[0]

    @property
    def leased_bytes(self) -> int:
        return ray.get(self._keeper.stats.remote())[1]


class RayObjectStoreKVReceiver:
    """Decode side: polls object readiness; never blocks the engine loop."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._pending: dict[str, tuple[RayKVRef, float]] = {}

    def start(self, handle: KVHandle, *, timeout_s: float) -> None:
        if handle.backend != BACKEND:
            raise ValueError(f"handle of backend {handle.backend!r} given to {BACKEND!r}")
        self._pending[handle.request_id] = (handle.ref, self._clock() + timeout_s)

    def poll(self, request_id: str) -> ReceiveResult:
        if request_id not in self._pending:
            return ReceiveResult(TransferStatus.ABORTED, error="no pull in progress")
        locator, deadline = self._pending[request_id]
        if self._clock() > deadline:
            self._finish(request_id)
            return ReceiveResult(TransferStatus.EXPIRED, error="KV pull deadline passed")
        ready, _ = ray.wait(locator.refs, timeout=0, fetch_local=True)
        if not ready:
            return ReceiveResult(TransferStatus.PENDING)
        try:
            header_bytes, ks, vs = ray.get(locator.refs[0])
        except ray.exceptions.RayError as e:  # owner died, object lost
            self._finish(request_id)
            return ReceiveResult(TransferStatus.FAILED, error=f"KV object unavailable: {e}")
        self._finish(request_id)
        header = KVHeader.decode(header_bytes)
        dtype = _DTYPES[header.fingerprint.dtype]
        kv = PackedKV(k=[_from_numpy(a, dtype) for a in ks], v=[_from_numpy(a, dtype) for a in vs])
        return ReceiveResult(TransferStatus.DONE, header, kv)

    def abort(self, request_id: str) -> None:
        if request_id in self._pending:
            self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        locator, _ = self._pending.pop(request_id)
        locator.keeper.release.remote(request_id)
