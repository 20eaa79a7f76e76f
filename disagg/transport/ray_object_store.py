"""KV through the Ray object store: works on CPU and across nodes (the portable fallback).

Prefill side: each layer, as soon as it is computed, is staged (GPU: an async copy into a
pinned host buffer on a copy stream, after the layer's CUDA event; CPU: the layer's own
tensors, no copy) and ``ray.put`` by a background thread while the next layers run, one
object per layer holding K and V (16-bit dtypes as int16 views: numpy has no bfloat16).
``finish`` waits for the last put and hands the refs to a small ``LeaseKeeper`` actor (it
shares the prefill process's fate) that holds them until decode has copied them, until the
lease expires, or until the decode replica that would pull them is gone (the destination's
``owner``, a named Ray actor the keeper looks up every ``owner_check_s``: a decode replica
that dies between the publish and its pull would otherwise leave the KV held for the whole
lease). Token 0 never waits for any of this.
Decode side: ``complete`` brings the refs; ``poll`` checks readiness with ``ray.wait`` (which
fetches the objects to this node); once all are local a copy thread writes them into the
reserved rows (on its own CUDA stream on GPU) while the engine goes on stepping other
requests; the next poll after it finished says DONE and the lease is released.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch

from disagg.transport.base import (
    KVCompletion,
    KVDestination,
    KVHeader,
    KVTransferAborted,
    ReceiveResult,
    Run,
    TransferStatus,
)

BACKEND = "object_store"


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.element_size() == 2 else t).numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # Arrays from the object store are read-only views; decode only copies out of them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(dtype) if t.dtype != dtype else t


def actor_owner() -> str:
    """This process's named Ray actor as ``namespace/name`` (a Serve replica), the ``owner``
    its destinations carry; "" when it is not a named actor."""
    name = ray.get_runtime_context().get_actor_name()
    if not name:
        return ""
    # The runtime context gives the job's namespace, not the actor's (Serve's is its own).
    namespaces = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"] == name]
    return f"{namespaces[0]}/{name}" if len(namespaces) == 1 else ""


def _owner_alive(owner: str) -> bool:
    """Whether the named actor ``namespace/name`` is alive: Ray drops a name when its actor
    dies. An error other than "no such actor" (the GCS briefly away) counts as alive: the
    lease's expiry still bounds it."""
    namespace, _, name = owner.partition("/")
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 (unknown: keep the lease, its expiry bounds it)
        return True
    return True


@dataclass
class _Lease:
    refs: list
    num_bytes: int
    expires_at: float  # time.monotonic()
    owner: str  # the destination's owner ("" unknown)


@ray.remote(num_cpus=0)
class LeaseKeeper:
    """Holds published KV objects under leases (refs wrapped in lists: never dereferenced).
    A watcher thread ends, every ``owner_check_s``, the leases that expired and those whose
    owner is gone (its pull will never come)."""

    def __init__(self, owner_check_s: float = 1.0):
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()  # the actor's calls and the watcher
        self._num_orphaned = 0  # leases ended because their owner was gone
        threading.Thread(target=self._watch, args=(owner_check_s,), name="lease-watch",
                         daemon=True).start()

    def hold(self, request_id: str, refs: list, num_bytes: int, lease_s: float,
             owner: str = "") -> None:
        with self._lock:
            self._leases[request_id] = _Lease(refs, num_bytes, time.monotonic() + lease_s,
                                              owner)

    def release(self, request_id: str) -> bool:
        with self._lock:
            return self._leases.pop(request_id, None) is not None

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
            for rid in expired:
                del self._leases[rid]
        return expired

    def end_orphans(self) -> list[str]:
        """End the leases whose owner is gone; their request ids."""
        with self._lock:
            owners = {lease.owner for lease in self._leases.values() if lease.owner}
        gone = {o for o in owners if not _owner_alive(o)}  # lookups outside the lock
        with self._lock:
            orphans = [rid for rid, lease in self._leases.items() if lease.owner in gone]
            for rid in orphans:
                del self._leases[rid]
            self._num_orphaned += len(orphans)
        return orphans

    def _watch(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            self.expire()
            self.end_orphans()

    def stats(self) -> tuple[int, int]:
        self.expire()
        with self._lock:
            return len(self._leases), sum(lease.num_bytes for lease in self._leases.values())

    def num_orphaned(self) -> int:
        """Leases ended so far because their owner was gone."""
        return self._num_orphaned


@dataclass(frozen=True)
class RayKVRef:
    """The locator in a completion record: one object per layer (in a list, so Ray passes
    them by reference), the keeper that holds their lease, and the destination rows they
    fill (``runs`` with token indices into the objects' rows). A sequence-parallel prefill's
    record carries a tuple of them, one per rank, each with its rank's rows."""

    refs: list
    keeper: ray.actor.ActorHandle
    runs: tuple[Run, ...] | None = None  # None: the destination's runs


def _parts(payload) -> tuple[RayKVRef, ...]:
    return payload if isinstance(payload, tuple) else (payload,)


class ObjectStoreKVWriter:
    """Stages and puts one request's layers while prefill runs on."""

    def __init__(self, destination: KVDestination, keeper, executor: ThreadPoolExecutor, *,
                 num_layers: int, lease_s: float, call_timeout_s: float = 30.0):
        self.destination = destination
        self._call_timeout_s = call_timeout_s
        self._keeper = keeper
        self._executor = executor
        self._num_layers = num_layers
        self._lease_s = lease_s
        self._puts: list = []
        self._bytes = 0
        self._aborted = threading.Event()
        self._lock = threading.Lock()  # a lease is published, or the writer aborted: not both
        self._published: str | None = None  # request id of the lease published by finish
        self._stream = None

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._aborted.is_set() or self.destination.expired():
            raise KVTransferAborted(f"KV of {self.destination.request_id!r}: aborted or expired")
        event = None
        if k.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(k.device)
            self._stream.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(self._stream):
                k = k.to("cpu", non_blocking=True)  # pinned by the caching host allocator
                v = v.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        self._bytes += 2 * k.numel() * k.element_size()
        self._puts.append(self._executor.submit(self._put, k, v, event))

    def _put(self, k: torch.Tensor, v: torch.Tensor, event) -> ray.ObjectRef | None:
        if event is not None:
            event.synchronize()
        if self._aborted.is_set():
            return None
        return ray.put((_numpy(k), _numpy(v)))

    def finish(self, header: KVHeader) -> KVCompletion:
        t0 = time.perf_counter()
        refs = [f.result() for f in self._puts]
        with self._lock:
            if self._aborted.is_set() or len(refs) != self._num_layers or None in refs:
                raise KVTransferAborted(f"KV of {header.request_id!r} was aborted or is "
                                        "incomplete")
            ray.get(self._keeper.hold.remote(header.request_id, refs, self._bytes,
                                             self._lease_s, self.destination.owner),
                    timeout=self._call_timeout_s)  # GetTimeoutError: the keeper does not answer
            self._published = header.request_id
        return KVCompletion(header, BACKEND, self._bytes, self._num_layers,
                            time.perf_counter() - t0,
                            RayKVRef(refs, self._keeper, self.destination.runs))

    def abort(self) -> None:
        """Stop writing; a lease ``finish`` already published is released (its caller was
        cancelled while or after finishing: no decode will pull it)."""
        with self._lock:
            self._aborted.set()
            published, self._published = self._published, None
        for f in self._puts:
            f.cancel()
        if published is not None:
            self._keeper.release.remote(published)


class RayObjectStoreKVSender:
    """Prefill side. One staging thread; the lease keeper lives as long as this process."""

    backend = BACKEND

    def __init__(self, lease_s: float = 60.0, call_timeout_s: float = 30.0,
                 owner_check_s: float = 1.0):
        self._keeper = LeaseKeeper.remote(owner_check_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-put")
        self._lease_s = lease_s
        self._call_timeout_s = call_timeout_s  # each call to the keeper

    def accepts(self, destination: KVDestination) -> bool:
        return destination.backend == BACKEND  # the object store reaches every node

    def open(self, destination: KVDestination, *, num_layers: int) -> ObjectStoreKVWriter:
        if destination.backend != BACKEND:
            raise ValueError(f"destination of backend {destination.backend!r} given to {BACKEND}")
        return ObjectStoreKVWriter(destination, self._keeper, self._executor,
                                   num_layers=num_layers, lease_s=self._lease_s,
                                   call_timeout_s=self._call_timeout_s)

    def leased(self) -> tuple[int, int]:
        """(leases held, bytes they hold) -- KV published and not yet copied by decode."""
        return ray.get(self._keeper.stats.remote(), timeout=self._call_timeout_s)

    def num_orphaned(self) -> int:
        """Leases ended so far because the decode replica that would pull them was gone."""
        return ray.get(self._keeper.num_orphaned.remote(), timeout=self._call_timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RayObjectStoreKVReceiver:
    """Decode side: polls object readiness and copies arrived KV into the pool on a thread of
    its own (a CUDA stream of its own on GPU), so the engine loop never waits for a copy.
    ``owner``: the named Ray actor this receiver lives in (``actor_owner()``), which its
    destinations carry so that prefill ends their leases if it dies before pulling."""

    backend = BACKEND

    def __init__(self, clock: Callable[[], float] = time.time, owner: str = ""):
        self.endpoint = f"{BACKEND}:{uuid.uuid4().hex}"
        self.owner = owner
        self._clock = clock
        self._cache = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-copy")
        self._destinations: dict[str, KVDestination] = {}
        self._pending: dict[str, tuple[RayKVRef, ...]] = {}
        self._copies: dict[str, tuple[Future, threading.Event]] = {}
        self._done: dict[str, ReceiveResult] = {}

    def attach(self, cache) -> None:
        self._cache = cache

    def destination(self, request_id: str, runs: tuple[Run, ...], num_prompt_tokens: int,
                    *, ttl_s: float) -> KVDestination:
        dest = KVDestination(request_id, BACKEND, self.endpoint, runs, num_prompt_tokens,
                             self._clock() + ttl_s, owner=self.owner)
        self._destinations[request_id] = dest
        return dest

    def complete(self, completion: KVCompletion) -> None:
        locator = _parts(completion.payload)
        if completion.request_id not in self._destinations:
            for part in locator:
                part.keeper.release.remote(completion.request_id)
            self._done[completion.request_id] = ReceiveResult(TransferStatus.ABORTED,
                                                              "no destination for this request")
            return
        self._pending[completion.request_id] = locator

    def poll(self, request_id: str) -> ReceiveResult:
        if request_id in self._done:
            return self._done[request_id]
        locator = self._pending.get(request_id)
        if locator is None:
            return ReceiveResult(TransferStatus.PENDING)
        if request_id in self._copies:
            copy, _ = self._copies[request_id]
            if not copy.done():
                return ReceiveResult(TransferStatus.PENDING)
            del self._copies[request_id]
            error = copy.exception()
            return self._end(request_id, ReceiveResult(TransferStatus.DONE) if error is None
                             else ReceiveResult(TransferStatus.FAILED,
                                                f"KV objects could not be copied in: {error}"))
        dest = self._destinations[request_id]
        if self._clock() >= dest.expires_at:
            return self._end(request_id, ReceiveResult(TransferStatus.EXPIRED,
                                                       "KV pull deadline passed"))
        refs = [ref for part in locator for ref in part.refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        if len(ready) == len(refs):  # all on this node: copy them in
            aborted = threading.Event()
            self._copies[request_id] = (
                self._executor.submit(self._copy_in, locator, dest, aborted), aborted)
        return ReceiveResult(TransferStatus.PENDING)

    def _copy_in(self, locator: tuple[RayKVRef, ...], dest: KVDestination,
                 aborted: threading.Event) -> None:
        dtype = self._cache.layout.dtype
        stream = torch.cuda.Stream(self._cache.device) if self._cache.device.type == "cuda" \
            else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for part in locator:
                # Local already (zero-copy views of the objects); bounded by the pull deadline
                # should one be lost meanwhile (GetTimeoutError: the pull FAILED).
                layers = ray.get(part.refs, timeout=max(1.0, dest.expires_at - self._clock()))
                for layer, (k, v) in enumerate(layers):
                    if aborted.is_set():
                        raise KVTransferAborted(f"KV of {dest.request_id!r} released mid-copy")
                    self._cache.write_runs(layer, part.runs or dest.runs, _tensor(k, dtype),
                                           _tensor(v, dtype))
        if stream is not None:
            stream.synchronize()

    def _end(self, request_id: str, result: ReceiveResult) -> ReceiveResult:
        locator = self._pending.pop(request_id, None)
        for part in locator or ():
            part.keeper.release.remote(request_id)
        self._done[request_id] = result
        return result

    def release(self, request_id: str) -> None:
        """Forget the request; a copy into its rows in flight stops at its next layer and is
        waited for (the rows may go to another request right after)."""
        copy = self._copies.pop(request_id, None)
        if copy is not None:
            future, aborted = copy
            aborted.set()
            with contextlib.suppress(Exception):
                future.result()
        self._end(request_id, ReceiveResult(TransferStatus.ABORTED))
        self._destinations.pop(request_id, None)
        self._done.pop(request_id, None)

    def close(self) -> None:
        for request_id in list(self._pending):
            self.release(request_id)
        self._executor.shutdown(wait=True)
