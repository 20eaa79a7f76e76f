"""Backends that write KV in place into decode's pool: ``inprocess`` and ``cuda_ipc``.

The prefill writer copies each layer's K/V straight into the decode pool's reserved rows, one
copy per row run, on a copy stream that waits for the layer's CUDA event (so the copy overlaps
the next layers); on CPU the copy is immediate. There is no staging buffer and no lease: when
``finish`` returns, the KV is already where decode reads it.

- ``inprocess``: prefill and decode engines in one process (CLI, tests): the sender finds the
  pool by its endpoint in this process's registry.
- ``cuda_ipc``: replicas on one node. The decode replica exports its pool once
  (``CudaIpcExport``: torch's CUDA IPC handles of every layer's K and V tensor); each prefill
  replica maps an export once, the first time it sees its endpoint, and keeps the mapping.
  Ray shows each actor only its own GPU: for replicas on different GPUs of one node, start
  them with every GPU visible (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``, each replica
  selecting its own GPU from ``ray.get_gpu_ids()``) so a handle opens on the GPU that holds it
  and the copy goes over NVLink peer access.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

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

INPROCESS, CUDA_IPC = "inprocess", "cuda_ipc"
_POOLS: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # inprocess registry


@dataclass(frozen=True)
class CudaIpcExport:
    """A decode pool's CUDA IPC handles (torch's ``reduce_tensor`` pairs), one per tensor."""

    endpoint: str
    k: tuple
    v: tuple


def _direct_backend(backend: str) -> str:
    if backend not in (INPROCESS, CUDA_IPC):
        raise ValueError(f"unknown direct backend {backend!r}")
    return backend


class DirectKVWriter:
    """Writes one request's layers into ``k_pool``/``v_pool`` rows of ``destination.runs``."""

    def __init__(self, destination: KVDestination, k_pool: list[torch.Tensor],
                 v_pool: list[torch.Tensor], *, backend: str, num_layers: int,
                 clock: Callable[[], float] = time.time):
        self.destination = destination
        self._clock = clock
        self.backend = backend
        self._k_pool, self._v_pool = k_pool, v_pool
        self._num_layers = num_layers
        self._written: set[int] = set()
        self._aborted = False
        self._bytes = 0
        cuda = k_pool[0].is_cuda
        self._stream = torch.cuda.Stream(k_pool[0].device) if cuda else None

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._aborted:
            raise KVTransferAborted(f"request {self.destination.request_id!r} was aborted")
        if self.destination.expired(self._clock()):
            raise KVTransferAborted(f"KV destination of {self.destination.request_id!r} expired")
        if k.shape[0] != self.destination.num_prompt_tokens:
            raise ValueError(f"layer of {k.shape[0]} rows for a destination of "
                             f"{self.destination.num_prompt_tokens}")
        if self._stream is None:
            self._copy(layer, k, v)
        else:
            self._stream.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(self._stream):
                self._copy(layer, k, v)
            k.record_stream(self._stream)  # the allocator must not reuse them before the copy
            v.record_stream(self._stream)
        self._written.add(layer)
        self._bytes += 2 * k.numel() * k.element_size()

    def _copy(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k_dst, v_dst = self._k_pool[layer], self._v_pool[layer]
        for slot, token, n in self.destination.runs:
            k_dst[slot:slot + n].copy_(k[token:token + n], non_blocking=True)
            v_dst[slot:slot + n].copy_(v[token:token + n], non_blocking=True)

    def finish(self, header: KVHeader) -> KVCompletion:
        t0 = time.perf_counter()
        if self._stream is not None:
            self._stream.synchronize()
        if self._aborted:
            raise KVTransferAborted(f"request {self.destination.request_id!r} was aborted")
        missing = sorted(set(range(self._num_layers)) - self._written)
        if missing:
            raise KVTransferAborted(f"layers {missing} of {self.destination.request_id!r} were "
                                    "never written")
        return KVCompletion(header, self.backend, self._bytes, self._num_layers,
                            time.perf_counter() - t0)

    def abort(self) -> None:
        self._aborted = True
        if self._stream is not None:
            self._stream.synchronize()  # no copy of ours may still be running afterwards


class DirectKVSender:
    """Prefill side of ``inprocess`` and ``cuda_ipc``: opens writers into decode pools."""

    def __init__(self, backend: str = INPROCESS, node: str = "",
                 clock: Callable[[], float] = time.time):
        self.backend = _direct_backend(backend)
        self.node = node
        self._clock = clock
        self._mapped: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def accepts(self, destination: KVDestination) -> bool:
        if destination.backend != self.backend:
            return False
        if self.backend == INPROCESS:
            return destination.endpoint in _POOLS
        return destination.node == self.node and destination.endpoint in self._mapped

    def on_this_node(self, offers: tuple[KVDestination, ...]) -> bool:
        """Whether one of ``offers`` is a pool of this backend on this sender's node: only
        then may its export be ``register``ed (CUDA IPC handles open on no other node)."""
        return any(d.backend == self.backend and d.node == self.node for d in offers)

    def register(self, export: CudaIpcExport) -> None:
        """Map a decode pool's IPC handles, once per endpoint (later calls are free)."""
        if export.endpoint in self._mapped:
            return
        self._mapped[export.endpoint] = ([fn(*args) for fn, args in export.k],
                                         [fn(*args) for fn, args in export.v])

    @property
    def num_mapped(self) -> int:
        return len(self._mapped)

    def open(self, destination: KVDestination, *, num_layers: int) -> DirectKVWriter:
        if destination.backend != self.backend:
            raise ValueError(f"destination of backend {destination.backend!r} given to "
                             f"{self.backend!r}")
        pools = (_POOLS if self.backend == INPROCESS else self._mapped).get(destination.endpoint)
        if pools is None:
            raise KVTransferAborted(f"no {self.backend} pool is known for endpoint "
                                    f"{destination.endpoint!r}")
        return DirectKVWriter(destination, *pools, backend=self.backend, num_layers=num_layers,
                              clock=self._clock)

    def leased(self) -> tuple[int, int]:
        return 0, 0  # written in place: nothing waits to be pulled

    def close(self) -> None:
        self._mapped.clear()


class DirectKVReceiver:
    """Decode side of ``inprocess`` and ``cuda_ipc``: the KV is in place once prefill's
    completion record says every layer was written."""

    def __init__(self, backend: str = INPROCESS, node: str = "",
                 clock: Callable[[], float] = time.time):
        self.backend = _direct_backend(backend)
        self.node = node
        self.endpoint = f"{backend}:{uuid.uuid4().hex}"
        self._clock = clock
        self._cache = None
        self._destinations: dict[str, KVDestination] = {}
        self._done: dict[str, ReceiveResult] = {}

    def attach(self, cache) -> None:
        if self.backend == CUDA_IPC and cache.device.type != "cuda":
            raise ValueError("cuda_ipc needs the decode pool on a CUDA device")
        self._cache = cache
        if self.backend == INPROCESS:
            _POOLS[self.endpoint] = (cache.k, cache.v)

    def export(self) -> CudaIpcExport:
        """This pool's IPC handles (the prefill side maps them once)."""
        from torch.multiprocessing.reductions import reduce_tensor

        return CudaIpcExport(self.endpoint, tuple(reduce_tensor(t) for t in self._cache.k),
                             tuple(reduce_tensor(t) for t in self._cache.v))

    def destination(self, request_id: str, runs: tuple[Run, ...], num_prompt_tokens: int,
                    *, ttl_s: float) -> KVDestination:
        dest = KVDestination(request_id, self.backend, self.endpoint, runs, num_prompt_tokens,
                             self._clock() + ttl_s, self.node)
        self._destinations[request_id] = dest
        return dest

    def complete(self, completion: KVCompletion) -> None:
        dest = self._destinations.get(completion.request_id)
        if dest is None:
            result = ReceiveResult(TransferStatus.ABORTED, "no destination for this request")
        elif self._clock() >= dest.expires_at:
            result = ReceiveResult(TransferStatus.EXPIRED, "KV completed after its destination "
                                                           "expired")
        elif completion.num_layers != len(self._cache.k):
            result = ReceiveResult(TransferStatus.FAILED, f"{completion.num_layers} layers "
                                                          f"written, {len(self._cache.k)} expected")
        else:
            result = ReceiveResult(TransferStatus.DONE)
        self._done[completion.request_id] = result

    def poll(self, request_id: str) -> ReceiveResult:
        return self._done.get(request_id, ReceiveResult(TransferStatus.PENDING))

    def release(self, request_id: str) -> None:
        self._destinations.pop(request_id, None)
        self._done.pop(request_id, None)

    def close(self) -> None:
        _POOLS.pop(self.endpoint, None)
