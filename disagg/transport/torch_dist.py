"""KV over torch.distributed point-to-point: ``nccl`` (GPU to GPU, across nodes) and ``gloo``
(the same code on CPU tensors, which the CPU tests run).

Life of one hand-off here:
1. The decode receiver hosts a ``TCPStore`` (started once, in ``__init__``); its ``host:port``
   is the endpoint every destination carries, so rendezvous travels inside the Ray calls that
   carry the offers. No global ``init_process_group``: a replica pairs with many peers.
2. Pairing, once per prefill sender and decode receiver: the first time a sender sees an
   endpoint it takes a number from the store's counter and builds a 2-rank process group
   (prefill rank 0, decode rank 1) on ``PrefixStore("pairing/<n>/", store)``; the receiver's
   listener thread sees the counter move and builds its side in a thread of its own for that
   pairing. A hello message proves the group works (and makes NCCL connect) before use.
3. ``open`` announces the transfer in the store (``open/<seq>`` = transfer id, expiry, number
   of layers, run lengths): the pairing's receiving thread sleeps in ``store.wait`` while
   nothing is announced, because a process-group receive cannot wait idle -- gloo closes the
   pair when a wait times out.
4. ``write_layer`` posts, on the pairing's stream (ordered after the layer's compute), a header
   ``[kind, transfer_id, layer, num_tokens, num_runs]``, then K and V of each run. The
   receiving thread reads the header and receives each run straight into the pool rows
   ``cache.k[layer][slot:slot + n]`` (contiguous views, no staging copy). A transfer that decode
   released, that expired or that failed is received into a scratch buffer and dropped: the
   stream stays in step, and the rows are never written for a request that no longer owns them.
5. ``finish`` waits for every send (deadline ``timeout_s``) and returns the ``KVCompletion``;
   ``abort`` (also taken when a layer would start after the destination's expiry) sends an
   ABORT header so decode stops expecting the remaining layers.
6. ``poll`` (never blocking) is DONE once every layer is in the rows and ``complete`` was
   called before the expiry; EXPIRED past it; ABORTED on prefill's abort; FAILED when the
   pairing broke: a dead peer (gloo sees the closed connection), or a receive past
   ``max(expiry of the announced transfers) + timeout_s`` (a stalled peer; NCCL's only sign of
   a dead one) -- every transfer of that pairing fails and the pairing is dropped on both
   sides (decode marks it ``closed`` in the store), so the next ``open`` forms a new one.
   Not noticed: a sender that dies while its pairing is idle -- that thread and group stay,
   asleep in the store, until the receiver closes.

Not Ray Direct Transport: its NCCL path refuses async actors, which Serve replicas are, and it
needs cupy; Ray here only carries the endpoint.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import msgpack
import torch
import torch.distributed as dist

from disagg.errors import KVTransferError
from disagg.transport.base import (
    KVCompletion,
    KVDestination,
    KVHeader,
    KVTransferAborted,
)
from disagg.transport.torch_dist_channel import (
    ABORT,
    CLOSED_ANNOUNCEMENT,
    COMM_ERRORS,
    GLOO,
    HELLO,
    LAYER,
    NCCL,
    NUM_PAIRINGS,
    Channel,
    connect_store,
    run_lengths,
)
from disagg.transport.torch_dist_receive import TorchDistKVReceiver

__all__ = ["GLOO", "NCCL", "TorchDistKVReceiver", "TorchDistKVSender", "TorchDistKVWriter"]


class _PrefillPairing:
    """Prefill's side of one pairing: the communicator and the order of what is posted."""

    def __init__(self, endpoint: str, backend: str, device: torch.device, timeout_s: float):
        self.endpoint = endpoint
        self._lock = threading.Lock()  # one layer's messages are posted back to back
        self._seq = 0
        self.error: str | None = None
        root = connect_store(endpoint, timeout_s)
        self.pairing_id = root.add(NUM_PAIRINGS, 1)
        self._store = dist.PrefixStore(f"pairing/{self.pairing_id}/", root)
        self.channel = Channel(backend, self._store, 0, device, timeout_s)
        with self.channel.on_stream():
            hello = self.channel.ints([HELLO, self.pairing_id])
            self.channel.wait([self.channel.send(hello)], time.monotonic() + timeout_s)

    def announce(self, destination: KVDestination, num_layers: int) -> None:
        """Tell decode's receiving thread a transfer comes (it sleeps in the store till then)."""
        with self._lock:
            self._check()
            if self._store.check(["closed"]):  # decode dropped its side (a timeout, a close)
                self.error = "decode closed the pairing"
                self._check()
            self._store.set(f"open/{self._seq}", msgpack.packb(
                [LAYER, destination.transfer_id, destination.expires_at, num_layers,
                 run_lengths(destination.runs)]))
            self._seq += 1

    def post(self, tensors: list[torch.Tensor]) -> list:
        with self._lock:
            self._check()
            return [self.channel.send(t) for t in tensors]

    def _check(self) -> None:
        if self.error is not None:
            raise KVTransferError(f"KV pairing with {self.endpoint} broke: {self.error}")

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self.channel.close()

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            if self.error is None:
                self._store.set(f"open/{self._seq}", msgpack.packb(CLOSED_ANNOUNCEMENT))
        self.fail("closed")


class TorchDistKVWriter:
    """Posts one request's layers on its pairing as they are computed."""

    def __init__(self, destination: KVDestination, pairing: _PrefillPairing, *, backend: str,
                 num_layers: int, timeout_s: float, on_error: Callable[[_PrefillPairing], None],
                 clock: Callable[[], float] = time.time):
        self.destination = destination
        self._clock = clock
        self.backend = backend
        self._pairing = pairing
        self._num_layers = num_layers
        self._timeout_s = timeout_s
        self._on_error = on_error
        self._lock = threading.Lock()
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []  # a send and its tensor
        self._written: set[int] = set()
        self._bytes = 0
        self._aborted = False
        pairing.announce(destination, num_layers)

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Post ``layer``'s header and its K/V runs. The sends hold ``k``/``v`` (a contiguous
        copy when they are views that are not) until done: on GPU the caller may free them at
        once (they are recorded on the pairing's stream); on CPU it must not write into them
        afterwards (a prefill computes fresh K/V per layer)."""
        with self._lock:
            if self._aborted:
                raise KVTransferAborted(f"request {self.destination.request_id!r} was aborted")
            if self.destination.expired(self._clock()):
                self._abort_locked()
                raise KVTransferAborted(f"KV destination of {self.destination.request_id!r} "
                                        "expired")
            if k.shape[0] != self.destination.num_prompt_tokens or v.shape != k.shape:
                raise ValueError(f"layer of {tuple(k.shape)} rows for a destination of "
                                 f"{self.destination.num_prompt_tokens}")
            if not 0 <= layer < self._num_layers or layer in self._written:
                raise ValueError(f"layer {layer} of {self._num_layers} written twice or out of "
                                 "range")  # decode counts the layers each transfer announced
            channel = self._pairing.channel
            if k.is_cuda:
                channel.stream.wait_stream(torch.cuda.current_stream(k.device))
                for t in (k, v):  # the caller may free them once its own stream moves on
                    t.record_stream(channel.stream)
            with channel.on_stream():
                k, v = k.contiguous(), v.contiguous()
                runs = self.destination.runs
                tensors = [channel.ints([LAYER, self.destination.transfer_id, layer,
                                         k.shape[0], len(runs)])]
                for _, token, n in runs:
                    tensors += [k[token:token + n], v[token:token + n]]
                works = self._post(tensors)
            # Each work keeps its tensor alive until it is done (NCCL runs on its own stream).
            self._pending += list(zip(works, tensors))
            self._pending = [(w, t) for w, t in self._pending
                             if channel.backend == GLOO or not w.is_completed()]
            self._written.add(layer)
            self._bytes += 2 * k.numel() * k.element_size()

    def _post(self, tensors: list[torch.Tensor]) -> list:
        try:
            return self._pairing.post(tensors)
        except KVTransferError:
            self._aborted = True
            raise
        except COMM_ERRORS as e:
            self._broken(e)

    def _broken(self, e: Exception) -> NoReturn:
        self._aborted = True
        self._pairing.fail(f"{type(e).__name__}: {e}")
        self._on_error(self._pairing)
        raise KVTransferError(f"KV of {self.destination.request_id!r} to "
                              f"{self.destination.endpoint}: {e}") from e

    def finish(self, header: KVHeader) -> KVCompletion:
        t0 = time.perf_counter()
        with self._lock:
            if self._aborted:
                raise KVTransferAborted(f"request {self.destination.request_id!r} was aborted")
            missing = sorted(set(range(self._num_layers)) - self._written)
            if missing:
                self._abort_locked()
                raise KVTransferAborted(f"layers {missing} of {header.request_id!r} were never "
                                        "written")
            self._wait_pending()
            if self.destination.expired(self._clock()):
                raise KVTransferAborted(f"KV of {header.request_id!r} completed after its "
                                        "destination expired")
        return KVCompletion(header, self.backend, self._bytes, self._num_layers,
                            time.perf_counter() - t0)

    def _wait_pending(self) -> None:
        try:
            self._pairing.channel.wait([w for w, _ in self._pending],
                                       time.monotonic() + self._timeout_s)
        except COMM_ERRORS as e:
            self._broken(e)
        finally:
            self._pending.clear()

    def abort(self) -> None:
        with self._lock:
            self._abort_locked()

    def _abort_locked(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        channel = self._pairing.channel
        with contextlib.suppress(KVTransferError), channel.on_stream():
            tail = channel.ints([ABORT, self.destination.transfer_id, -1, 0, 0])
            works = self._post([tail])
            self._pending += [(w, tail) for w in works]
            self._wait_pending()  # no send of ours may still read the caller's tensors


class TorchDistKVSender:
    """Prefill side: one pairing per decode endpoint, formed the first time it is seen."""

    def __init__(self, backend: str = GLOO, *, device: torch.device | str | None = None,
                 timeout_s: float = 30.0, clock: Callable[[], float] = time.time):
        """``timeout_s``: the longest a rendezvous or the wait for a request's sends takes."""
        if backend not in (GLOO, NCCL):
            raise ValueError(f"unknown torch.distributed backend {backend!r}")
        self.backend = backend
        self.device = torch.device(device or ("cuda" if backend == NCCL else "cpu"))
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pairings: dict[str, _PrefillPairing] = {}
        self.num_pairings_formed = 0

    def accepts(self, destination: KVDestination) -> bool:
        return destination.backend == self.backend  # reachability shows when the pairing forms

    def open(self, destination: KVDestination, *, num_layers: int) -> TorchDistKVWriter:
        if destination.backend != self.backend:
            raise ValueError(f"destination of backend {destination.backend!r} given to "
                             f"{self.backend!r}")
        try:
            return self._open(destination, num_layers)
        except KVTransferError:  # a pairing decode has dropped (or a broken one) forms anew, once
            return self._open(destination, num_layers)

    def _open(self, destination: KVDestination, num_layers: int) -> TorchDistKVWriter:
        pairing = self._pairing(destination.endpoint)
        try:
            return TorchDistKVWriter(destination, pairing, backend=self.backend,
                                     num_layers=num_layers, timeout_s=self.timeout_s,
                                     on_error=self._drop, clock=self._clock)
        except Exception as e:
            pairing.fail(str(e))
            self._drop(pairing)
            raise KVTransferError(f"could not open a KV transfer to {destination.endpoint}: "
                                  f"{e}") from e

    def _pairing(self, endpoint: str) -> _PrefillPairing:
        with self._lock:
            pairing = self._pairings.get(endpoint)
            if pairing is None or pairing.error is not None:
                try:
                    with torch.cuda.device(self.device) if self.device.type == "cuda" else \
                            contextlib.nullcontext():
                        pairing = _PrefillPairing(endpoint, self.backend, self.device,
                                                  self.timeout_s)
                except Exception as e:
                    raise KVTransferError(f"no KV pairing with {endpoint}: {e}") from e
                self._pairings[endpoint] = pairing
                self.num_pairings_formed += 1
            return pairing

    def _drop(self, pairing: _PrefillPairing) -> None:
        with self._lock:
            if self._pairings.get(pairing.endpoint) is pairing:
                del self._pairings[pairing.endpoint]

    def leased(self) -> tuple[int, int]:
        return 0, 0  # written into decode's rows: nothing waits to be pulled

    def close(self) -> None:
        with self._lock:
            pairings, self._pairings = list(self._pairings.values()), {}
        for pairing in pairings:
            pairing.close()

