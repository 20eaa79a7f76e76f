"""Decode side of the torch.distributed KV backend (``nccl`` / ``gloo``); the life of a
hand-off is in ``torch_dist``.

The receiver hosts the rendezvous store and attaches the pool; a listener thread starts one
receiving thread per pairing. Only those threads touch a process group; ``destination``,
``complete``, ``poll`` and ``release`` (the engine loop's calls) only take a short lock.
Receiving threads write pool rows of a transfer only while its destination is live (not
released, not expired, not failed); everything else goes to a scratch buffer.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch
import torch.distributed as dist

from disagg.errors import KVTransferError
from disagg.transport.base import (
    KVCompletion,
    KVDestination,
    ReceiveResult,
    Run,
    TransferStatus,
)
from disagg.transport.torch_dist_channel import (
    ABORT,
    CLOSED,
    CLOSED_ANNOUNCEMENT,
    GLOO,
    HEADER_LEN,
    HELLO,
    IDLE_WAIT_S,
    LAYER,
    LISTEN_INTERVAL_S,
    NCCL,
    NUM_PAIRINGS,
    Channel,
    connect_store,
    local_ip,
    run_lengths,
    td,
)


@dataclass
class _Transfer:
    """Decode's record of one destination."""

    destination: KVDestination
    layers: set[int] = field(default_factory=set)
    last_arrival: float = 0.0
    completed_at: float | None = None
    result: ReceiveResult | None = None  # decided by a receiving thread or by complete()


class _DecodePairing:
    """Decode's side of one pairing: a thread that receives every layer posted on it."""

    def __init__(self, receiver: TorchDistKVReceiver, pairing_id: int):
        self.receiver = receiver
        self.pairing_id = pairing_id
        self.seq = 0  # next announcement key; read by ``close`` under the receiver's lock
        # announced transfer id -> [expires_at, layers still to come, run lengths]
        self._active: dict[int, list] = {}
        self._ended: collections.deque[int] = collections.deque(maxlen=256)  # every layer came
        self._scratch: torch.Tensor | None = None
        self._header: tuple[torch.Tensor, dist.Work] | None = None  # a receive posted ahead
        self.thread = threading.Thread(target=self._run, name=f"kv-recv-{pairing_id}",
                                       daemon=True)

    def _run(self) -> None:
        r = self.receiver
        try:
            if r.device.type == "cuda":
                torch.cuda.set_device(r.device)
            self._store = dist.PrefixStore(f"pairing/{self.pairing_id}/",
                                           connect_store(r.endpoint, r.timeout_s))
            self.channel = Channel(r.backend, self._store, 1, r.device, r.timeout_s)
            with self.channel.on_stream():
                hello = self.channel.recv_ints(2, time.monotonic() + r.timeout_s)
            if hello != [HELLO, self.pairing_id]:
                raise KVTransferError(f"unexpected first message {hello}")
        except Exception as e:  # noqa: BLE001 (a thread that ends records why)
            r._pairing_ended(self, f"never formed: {e}", [])
            return
        r._pairing_formed(self)
        error = "the receiver was closed"
        try:
            with self.channel.on_stream():
                while self._step():
                    pass
        except Exception as e:  # noqa: BLE001 (every way out fails the pairing's transfers)
            error = f"{type(e).__name__}: {e}"
        finally:
            self.channel.close()
            r._pairing_ended(self, error, list(self._active))

    def _step(self) -> bool:
        """Handle one announcement or one posted message; False when the pairing ends."""
        r = self.receiver
        if not self._active:
            return self._announcement(IDLE_WAIT_S)
        kind, tid, layer, num_tokens, num_runs = self._recv_header()
        if kind == ABORT and tid in self._ended:  # aborted after its last layer (token 0 ended it)
            r._aborted(tid)
            return True
        while tid not in self._active:  # announcements are read when a header names them
            if not self._announcement(r.timeout_s):
                return False
        if kind == ABORT:
            self._end(tid)
            r._aborted(tid)
            return True
        sizes = self._active[tid][2]
        if kind != LAYER or len(sizes) != num_runs or sum(sizes) != num_tokens:
            raise KVTransferError(f"pairing out of step: header {[kind, tid, layer]} of "
                                  f"{num_runs} runs and {num_tokens} tokens; announced {sizes}")
        rows = r._rows(tid, layer, sizes)
        targets = rows or self._scratch_rows(sizes)  # referenced until the receives are done
        works = [self.channel.recv(t) for pair in targets for t in pair]
        if sum(entry[1] for entry in self._active.values()) > 1:
            self._post_header()  # more layers will come: the next header lands without a wait
        self.channel.wait(works, self._deadline())
        if rows is not None:
            r._arrived(tid, layer)
        self._active[tid][1] -= 1
        if self._active[tid][1] <= 0:
            self._end(tid)
            self._ended.append(tid)
        return True

    def _end(self, tid: int) -> None:
        del self._active[tid]
        if not self._active:
            self._scratch = None  # a released transfer's rows went here; idle pairings hold none

    def _announcement(self, timeout_s: float) -> bool:
        """Wait for the next ``open/<seq>`` key and take it; False on a close (either side)."""
        r = self.receiver
        with r._lock:
            if r._stop.is_set():
                return False
            key = f"open/{self.seq}"
        self._store.wait([key], td(timeout_s))
        kind, tid, expires_at, num_layers, sizes = msgpack.unpackb(self._store.get(key))
        self._store.delete_key(key)
        self.seq += 1
        if kind == CLOSED or r._stop.is_set():
            return False
        if min(sizes, default=1) < 1:
            raise KVTransferError(f"transfer {tid} announced runs {sizes}")
        self._active[tid] = [expires_at, num_layers, sizes]
        return True

    def _post_header(self) -> None:
        t = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.receiver.device)
        self._header = (t, self.channel.recv(t))

    def _recv_header(self) -> list[int]:
        if self._header is None:
            self._post_header()
        (t, work), self._header = self._header, None
        self.channel.wait([work], self._deadline())
        return t.tolist()

    def _deadline(self) -> float:
        """Monotonic deadline of the next receive: the last announced expiry + timeout_s."""
        r = self.receiver
        latest = max(entry[0] for entry in self._active.values())
        return time.monotonic() + max(latest - r._clock(), 0.0) + r.timeout_s

    def _scratch_rows(self, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Where a layer nobody owns is received and dropped: one buffer of the largest run."""
        layout, n = self.receiver.layout, max(sizes, default=0)
        if self._scratch is None or self._scratch.shape[1] < n:
            self._scratch = torch.empty((2, n, *layout.row_shape), dtype=layout.dtype,
                                        device=self.receiver.device)
        return [(self._scratch[0, :m], self._scratch[1, :m]) for m in sizes]


class TorchDistKVReceiver:
    """Decode side: hosts the rendezvous store; one receiving thread per pairing."""

    def __init__(self, backend: str = GLOO, *, device: torch.device | str | None = None,
                 host: str | None = None, node: str = "", timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        """``device``: where the pool will be (checked at ``attach``); ``host``: the address
        prefill replicas reach this one at (default: this host's address on its default
        route); ``timeout_s``: the longest a pairing waits beyond its transfers' expiry."""
        if backend not in (GLOO, NCCL):
            raise ValueError(f"unknown torch.distributed backend {backend!r}")
        self.backend = backend
        self._expected_device = torch.device(device) if device is not None else None
        host = host or local_ip()
        self.node = node
        self.timeout_s = timeout_s
        self._clock = clock
        self._master = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                     timeout=td(timeout_s))
        self.endpoint = f"{host}:{self._master.port}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._transfers: dict[int, _Transfer] = {}
        self._by_request: dict[str, int] = {}
        self._orphans: dict[str, ReceiveResult] = {}  # completions with no destination
        self._pairings: dict[int, _DecodePairing] = {}
        self._threads: list[threading.Thread] = []
        self._next_transfer_id = 1
        self.num_pairings_formed = 0
        self._cache = None

    @property
    def num_pairings(self) -> int:
        """Pairings alive now."""
        with self._lock:
            return len(self._pairings)

    @property
    def layout(self):
        return self._cache.layout

    @property
    def device(self) -> torch.device:
        return self._cache.device

    def attach(self, cache) -> None:
        if self.backend == NCCL and cache.device.type != "cuda":
            raise ValueError("nccl needs the decode pool on a CUDA device")
        if self._expected_device is not None and \
                cache.device.type != self._expected_device.type:
            raise ValueError(f"the pool is on {cache.device}, this receiver was built for "
                             f"{self._expected_device}")
        if self._cache is not None:
            raise RuntimeError("a torch.distributed receiver is attached once")
        self._cache = cache
        listener = threading.Thread(target=self._listen, name="kv-pairings", daemon=True)
        self._threads.append(listener)
        listener.start()

    def _listen(self) -> None:
        store, seen = connect_store(self.endpoint, self.timeout_s), 0
        while not self._stop.wait(LISTEN_INTERVAL_S):
            n = store.add(NUM_PAIRINGS, 0)
            for pairing_id in range(seen + 1, n + 1):
                pairing = _DecodePairing(self, pairing_id)
                with self._lock:
                    self._threads = [t for t in self._threads if t.is_alive()]
                    self._threads.append(pairing.thread)
                pairing.thread.start()
            seen = n

    def destination(self, request_id: str, runs: tuple[Run, ...], num_prompt_tokens: int,
                    *, ttl_s: float) -> KVDestination:
        with self._lock:
            transfer_id, self._next_transfer_id = self._next_transfer_id, \
                self._next_transfer_id + 1
            dest = KVDestination(request_id, self.backend, self.endpoint, tuple(runs),
                                 num_prompt_tokens, self._clock() + ttl_s, self.node,
                                 transfer_id)
            self._transfers.pop(self._by_request.get(request_id, -1), None)
            self._by_request[request_id] = transfer_id
            self._transfers[transfer_id] = _Transfer(dest)
        return dest

    def complete(self, completion: KVCompletion) -> None:
        rid = completion.request_id
        with self._lock:
            t = self._transfers.get(self._by_request.get(rid, -1))
            if t is None:
                self._orphans[rid] = ReceiveResult(TransferStatus.ABORTED,
                                                   "no destination for this request")
            elif completion.num_layers != self.layout.num_layers:
                t.result = t.result or ReceiveResult(
                    TransferStatus.FAILED, f"{completion.num_layers} layers written, "
                                           f"{self.layout.num_layers} expected")
            else:
                t.completed_at = self._clock()

    def poll(self, request_id: str) -> ReceiveResult:
        with self._lock:
            t = self._transfers.get(self._by_request.get(request_id, -1))
            if t is None:
                return self._orphans.get(request_id, ReceiveResult(TransferStatus.PENDING))
            if t.result is None:
                t.result = self._outcome(t)
            return t.result or ReceiveResult(TransferStatus.PENDING)

    def _outcome(self, t: _Transfer) -> ReceiveResult | None:
        expires_at = t.destination.expires_at
        if t.completed_at is not None and len(t.layers) == self.layout.num_layers:
            if max(t.completed_at, t.last_arrival) < expires_at:
                return ReceiveResult(TransferStatus.DONE)
            return ReceiveResult(TransferStatus.EXPIRED, "KV arrived after its destination "
                                                         "expired")
        if self._clock() >= expires_at:
            return ReceiveResult(TransferStatus.EXPIRED, "KV destination expired before every "
                                                         "layer arrived")
        return None

    def release(self, request_id: str) -> None:
        with self._lock:
            self._transfers.pop(self._by_request.pop(request_id, -1), None)
            self._orphans.pop(request_id, None)

    # --- called by the receiving threads -------------------------------------------------

    def _rows(self, transfer_id: int, layer: int, sizes: list[int]):
        """Pool row views for one layer of a live transfer; None: receive it into scratch."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None or t.result is not None or self._clock() >= t.destination.expires_at:
                return None
            runs = t.destination.runs
            if not 0 <= layer < self.layout.num_layers or sizes != run_lengths(runs):
                t.result = ReceiveResult(TransferStatus.FAILED, f"layer {layer} of runs {sizes} "
                                         f"does not fit the destination's runs {list(runs)}")
                return None
            k, v = self._cache.k[layer], self._cache.v[layer]
            return [(k[s:s + n], v[s:s + n]) for s, _, n in runs]

    def _arrived(self, transfer_id: int, layer: int) -> None:
        """A layer is in the rows ``_rows`` gave (the transfer may have been released since)."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is not None and t.result is None:
                t.layers.add(layer)
                t.last_arrival = self._clock()

    def _aborted(self, transfer_id: int) -> None:
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is not None and t.result is None:
                t.result = self._outcome(t) or ReceiveResult(TransferStatus.ABORTED,
                                                             "prefill aborted the transfer")

    def _pairing_formed(self, pairing: _DecodePairing) -> None:
        with self._lock:
            self._pairings[pairing.pairing_id] = pairing
            self.num_pairings_formed += 1

    def _pairing_ended(self, pairing: _DecodePairing, error: str, transfer_ids) -> None:
        """Fail the transfers it carried; tell the sender (its next ``open`` pairs anew)."""
        with contextlib.suppress(Exception):
            self._pairing_store(pairing.pairing_id).set("closed", b"1")
        with self._lock:
            self._pairings.pop(pairing.pairing_id, None)
            for tid in transfer_ids:
                t = self._transfers.get(tid)
                if t is not None and t.result is None:
                    t.result = ReceiveResult(TransferStatus.FAILED, f"KV pairing "
                                             f"{pairing.pairing_id} broke: {error}")

    def close(self) -> None:
        """Stop the listener and every idle pairing (a busy one ends by its deadline)."""
        with self._lock:
            self._stop.set()
            idle = [(p.pairing_id, p.seq) for p in self._pairings.values()]
            threads = list(self._threads)
        for pairing_id, seq in idle:  # wakes its thread from the store wait
            with contextlib.suppress(Exception):
                self._pairing_store(pairing_id).set(f"open/{seq}",
                                                    msgpack.packb(CLOSED_ANNOUNCEMENT))
        for thread in threads:
            thread.join(timeout=1.0)

    def _pairing_store(self, pairing_id: int) -> dist.PrefixStore:
        return dist.PrefixStore(f"pairing/{pairing_id}/", self._master)
