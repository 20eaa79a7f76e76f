"""The wire of the torch.distributed KV backend (see ``torch_dist``): message kinds, the
rendezvous store, and ``Channel`` -- one side of a pairing's 2-rank process group.

Every wait here has a deadline. Gloo waits take it directly (a timed-out gloo wait closes the
pair, so the pairing is then dropped); NCCL waits poll the work against it on the CPU and
abort the group when it passes (NCCL's own watchdog timeout is only a backstop).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

GLOO, NCCL = "gloo", "nccl"
NUM_PAIRINGS = "num_pairings"  # store counter: pairing numbers handed out so far
HELLO = 0x4B56  # first message of every pairing
LAYER, ABORT, CLOSED = 1, 2, 3  # header kinds; CLOSED only in the store
CLOSED_ANNOUNCEMENT = [CLOSED, -1, 0.0, 0, []]  # [kind, transfer_id, expires_at, layers, runs]
HEADER_LEN = 5  # [kind, transfer_id, layer, num_tokens, num_runs]
LISTEN_INTERVAL_S = 0.02
IDLE_WAIT_S = 3600.0  # store waits end early: an announcement or a close sets the key
_WATCHDOG_S = 3600.0  # NCCL's own timeout, a backstop behind our deadlines
COMM_ERRORS = (RuntimeError, TimeoutError, OSError)  # torch.distributed's errors are RuntimeError


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def connect_store(endpoint: str, timeout_s: float) -> dist.TCPStore:
    host, port = endpoint.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=td(timeout_s))


class Channel:
    """One side of a pairing's 2-rank process group: posts sends/receives to the peer and
    waits for them against a deadline."""

    def __init__(self, backend: str, store, rank: int, device: torch.device, timeout_s: float):
        self.backend, self.device, self.peer = backend, device, 1 - rank
        if backend == NCCL:
            # A broken pairing must fail its transfers, not tear the replica down (torch's
            # default on an asynchronous NCCL error).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = td(_WATCHDOG_S)
            self.group = dist.ProcessGroupNCCL(store, rank, 2, options)
            self.stream = torch.cuda.Stream(device)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, 2, td(timeout_s))
            self.stream = None

    def on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else \
            contextlib.nullcontext()

    def send(self, t: torch.Tensor):
        return self.group.send([t], self.peer, 0)

    def recv(self, t: torch.Tensor):
        return self.group.recv([t], self.peer, 0)

    def wait(self, works, deadline: float) -> None:
        """Block until every work is done; raise (TimeoutError or the backend's) otherwise."""
        for work in works:
            if self.backend == GLOO:
                work.wait(td(deadline - time.monotonic()))
                continue
            pause_s = 1e-5  # NCCL: a CPU-side deadline, then abort the group
            while not work.is_completed():
                if time.monotonic() >= deadline:
                    self.group.abort()
                    raise TimeoutError("NCCL operation of a KV pairing passed its deadline")
                time.sleep(pause_s)  # short first: a header is tiny; then spare the CPU
                pause_s = min(2 * pause_s, 5e-4)
            work.wait()  # raises the work's error, if any

    def ints(self, values: list[int]) -> torch.Tensor:
        """A small int64 message; on GPU copied from pinned memory, so that posting it never
        waits for the layer's compute."""
        t = torch.tensor(values, dtype=torch.int64)
        return t if self.stream is None else t.pin_memory().to(self.device, non_blocking=True)

    def recv_ints(self, n: int, deadline: float) -> list[int]:
        t = torch.empty(n, dtype=torch.int64, device=self.device)
        self.wait([self.recv(t)], deadline)
        return t.tolist()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.group.abort()


def run_lengths(runs) -> list[int]:
    return [n for _, _, n in runs]


def local_ip() -> str:
    """This host's address on its default route (what other nodes reach), else loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks a route
        return s.getsockname()[0]
    return "127.0.0.1"
