"""The simulated cluster: prefill groups (one SP group of ``sp`` GPUs each), decode replicas,
the KV link between them, and a routing policy that places every request.

Life of a request in the simulation (the Serve app's, DESIGN.md §2):
1. Arrives; the serving layer's overhead (``Overhead``: HTTP, tokenize, hops) passes; then the
   policy routes it (``Policy.route``) on a snapshot of every queue -- or rejects it (429/503).
2. Decode reserves its KV blocks between two engine steps (the engine loop runs calls only
   there), waiting FIFO while blocks are short.
3. Remote: the prompt queues FIFO at its prefill group; the forward takes
   ``cost.prefill_s(n, triangle_fraction, sp)``; token 0 is the first token. The KV is usable
   at decode after the exposed transfer over the link (layers streamed during prefill).
   Local: the decode replica prefills it in chunks of its token budget, mixed into its steps
   (a long prompt stalls the decode batch); token 0 comes at the end of the last chunk's step.
4. Decode steps (``cost.decode_step_s(batch, context)``) add one token to every running
   sequence; a request ends after ``output_tokens`` tokens and frees its blocks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from benchmarks.simulator.costs import Calibration
from benchmarks.simulator.events import EventLoop
from disagg.routing import QueuedPrefill, Rejection, RoutePlan

LOCAL, DISAGGREGATED = "local", "disaggregated"


@dataclass(frozen=True)
class PoolSpec:
    name: str
    sp: int = 1
    num_replicas: int = 1
    triangle_fraction: float = 0.0


@dataclass(frozen=True)
class ClusterSpec:
    pools: tuple[PoolSpec, ...]
    num_decode: int = 1
    link: str = "cuda_ipc"  # KV backend priced for the hand-off (a CostModel transfer name)
    decode_kv_tokens: int = 1 << 20  # KV pool of one decode replica, in tokens
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048  # decode's per-step token budget (local prefill chunks)
    # Prefill and decode replicas on one GPU (prefill_decode_1gpu.yaml). With the
    # calibration's measured ``contention`` (contention.json): a decode step that overlaps a
    # prefill takes ``decode_slowdown`` x longer and the prefill progresses at
    # 1 / ``prefill_slowdown`` of its speed meanwhile. Without it, the bound where the GPU
    # runs one process's kernels at a time: the step delays the prefill by its whole time
    # (decode_itl.json's GPU time is ~93% of its ITL).
    shared_gpu: bool = False
    step_runs: bool = True  # simulate unchanged batches' steps as one run (same result, faster)

    @property
    def num_gpus(self) -> int:
        return sum(p.sp * p.num_replicas for p in self.pools) + self.num_decode


@dataclass
class SimRequest:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    path: str | None = None
    status: int = 200  # 429 / 503: rejected by the policy
    routed_s: float | None = None
    prefill_start_s: float | None = None
    first_token_s: float | None = None
    second_token_s: float | None = None
    done_s: float | None = None
    num_tokens: int = 0
    decode: DecodeSim | None = field(default=None, repr=False)
    num_prefilled: int = 0  # local path: prompt tokens done so far

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.done_s is None or self.output_tokens < 2:
            return None
        return (self.done_s - self.first_token_s) / (self.output_tokens - 1)


class Policy(Protocol):
    name: str

    def route(self, request: SimRequest, cluster: Cluster) -> RoutePlan | Rejection: ...


class PrefillSim:
    """One prefill group: a FIFO of prompts, one forward at a time."""

    def __init__(self, cluster: Cluster, replica_id: str, pool: PoolSpec):
        self.cluster, self.replica_id, self.pool = cluster, replica_id, pool
        self.queue: deque[SimRequest] = deque()
        self.running: SimRequest | None = None
        self.routed: dict[int, SimRequest] = {}  # routed here, waiting for decode's blocks
        self.busy_s = 0.0
        self._finish_at = 0.0
        self._generation = 0  # invalidates a finish event that a delay moved

    def seconds(self, num_tokens: int) -> float:
        return self.cluster.calibration.prefill_s(num_tokens, sp=self.pool.sp,
                                                  triangle_fraction=self.pool.triangle_fraction)

    def submit(self, req: SimRequest) -> None:
        self.routed.pop(req.index, None)
        self.queue.append(req)
        self._start_next()

    def _start_next(self) -> None:
        if self.running is not None or not self.queue:
            return
        req = self.running = self.queue.popleft()
        req.prefill_start_s = self.cluster.loop.now
        duration = self.seconds(req.prompt_tokens)
        self.busy_s += duration
        self._finish_at = self.cluster.loop.now + duration
        self._schedule_finish()

    def _schedule_finish(self) -> None:
        self._generation += 1
        self.cluster.loop.at(self._finish_at, self._finish, self.running, self._generation)

    def delay(self, seconds: float) -> None:
        """A decode step on the same GPU overlapped the running prefill."""
        if self.running is not None and seconds > 0:
            self._finish_at += seconds
            self.busy_s += seconds
            self._schedule_finish()

    def _finish(self, req: SimRequest, generation: int) -> None:
        if generation != self._generation:
            return
        self.running = None
        c = self.cluster
        c.token(req)  # token 0 is sampled by prefill and streamed at once
        if req.done_s is None:
            exposed = c.cost.transfer_s(req.prompt_tokens * c.calibration.kv_bytes_per_token,
                                        c.spec.link)
            c.loop.after(exposed, req.decode.kv_ready, req)
        self._start_next()

    def load(self) -> tuple[QueuedPrefill, ...]:
        # What the router sent here counts as queued even before decode's reservation let
        # it through (the Serve app's InFlightLedger does the same).
        items = [QueuedPrefill(str(r.index), r.prompt_tokens)
                 for r in (*self.queue, *self.routed.values())]
        if self.running is not None:
            items.insert(0, QueuedPrefill(str(self.running.index), self.running.prompt_tokens,
                                          self.running.prefill_start_s))
        return tuple(items)

    @property
    def num_outstanding(self) -> int:
        return len(self.queue) + (self.running is not None)


class DecodeSim:
    """One decode replica: calls run between steps; each step decodes every running
    sequence and prefills local prompts within the token budget.

    Steps of an unchanged batch (no local prompt, no call) are simulated as one run of ``k``
    steps (``k`` = the fewest tokens any sequence still needs): step ``j`` takes
    ``A + B * j`` (the context grows by one token per sequence per step). A call arriving
    mid-run cuts the run at the next step boundary, where the real engine loop would run it.
    """

    def __init__(self, cluster: Cluster, replica_id: str):
        self.cluster, self.replica_id = cluster, replica_id
        spec = cluster.spec
        self.num_total_blocks = spec.decode_kv_tokens // spec.block_size
        self.num_free_blocks = self.num_total_blocks
        self.calls: deque = deque()
        self.reserving: deque[tuple[SimRequest, object]] = deque()  # waiting for blocks
        self.running: list[SimRequest] = []
        self.local_queue: deque[SimRequest] = deque()
        self.num_held = 0  # requests holding blocks (reserved, prefilling, decoding)
        self.stepping = False
        self.local_started: dict[int, float] = {}
        self._run: tuple | None = None  # (start, A, B, k, batch) of a run of plain steps
        self._generation = 0

    def _blocks(self, req: SimRequest) -> int:
        spec = self.cluster.spec
        return math.ceil((req.prompt_tokens + req.output_tokens) / spec.block_size)

    def call(self, fn, *args) -> None:
        self.calls.append((fn, args))
        if not self.stepping:
            self._boundary()
        elif self._run is not None:
            self._cut_run()

    @staticmethod
    def _run_end(a: float, b: float, j: int) -> float:
        return j * a + b * j * (j - 1) / 2

    def _cut_run(self) -> None:
        start, a, b, k, batch = self._run
        elapsed = self.cluster.loop.now - start
        j = max(1, int(elapsed / a) if a > 0 else 1)
        while j < k and self._run_end(a, b, j) < elapsed:
            j += 1
        while j > 1 and self._run_end(a, b, j - 1) >= elapsed:
            j -= 1
        if j < k:
            self._run = (start, a, b, j, batch)
            self._generation += 1
            self.cluster.loop.at(start + self._run_end(a, b, j), self._end_run,
                                 self._generation)

    def reserve(self, req: SimRequest, then) -> None:
        """Runs as a call: take the blocks (FIFO), then ``then(req)``."""
        self.reserving.append((req, then))

    def kv_ready(self, req: SimRequest) -> None:
        self.call(self._join, req)

    def _join(self, req: SimRequest) -> None:
        self.running.append(req)

    def _admit_reservations(self) -> None:
        while self.reserving and self._blocks(self.reserving[0][0]) <= self.num_free_blocks:
            req, then = self.reserving.popleft()
            self.num_free_blocks -= self._blocks(req)
            self.num_held += 1
            then(req)

    def release(self, req: SimRequest) -> None:
        self.num_free_blocks += self._blocks(req)
        self.num_held -= 1

    def _boundary(self) -> None:
        while self.calls:
            fn, args = self.calls.popleft()
            fn(*args)
        self._admit_reservations()
        spec, cost, now = self.cluster.spec, self.cluster.cost, self.cluster.loop.now
        batch = list(self.running)
        seconds = 0.0
        if batch:
            context = sum(r.prompt_tokens + r.num_tokens for r in batch)
            seconds += cost.decode_step_s(len(batch), context)
        budget = spec.max_batched_tokens - len(batch)
        chunks = []
        for req in self.local_queue:
            if budget <= 0:
                break
            take = min(budget, req.prompt_tokens - req.num_prefilled)
            start = req.num_prefilled
            seconds += cost.prefill_s(start + take) - (cost.prefill_s(start) if start else 0.0)
            self.local_started.setdefault(req.index, now)
            chunks.append((req, take))
            budget -= take
        if not batch and not chunks:
            self.stepping = False
            return
        self.stepping = True
        if batch and not chunks and spec.step_runs and not spec.shared_gpu:
            k = min(r.output_tokens - r.num_tokens for r in batch)
            b = len(batch) * cost.decode.per_context_token_s
            self._run = (now, seconds, b, k, batch)
            self._generation += 1
            self.cluster.loop.at(now + self._run_end(seconds, b, k), self._end_run,
                                 self._generation)
            return
        if spec.shared_gpu:
            contention = self.cluster.calibration.contention
            lost = seconds
            if contention is not None:
                if any(p.running is not None for p in self.cluster.prefill.values()):
                    seconds *= contention.decode_slowdown
                lost = seconds * (1 - 1 / contention.prefill_slowdown)
            for prefill in self.cluster.prefill.values():
                prefill.delay(lost)
        self.cluster.loop.after(seconds, self._end_step, batch, chunks)

    def _end_step(self, batch: list[SimRequest], chunks: list[tuple[SimRequest, int]]) -> None:
        c = self.cluster
        for req in batch:
            c.token(req)
        for req, take in chunks:
            req.num_prefilled += take
            if req.num_prefilled == req.prompt_tokens:
                self.local_queue.remove(req)
                req.prefill_start_s = self.local_started.pop(req.index)
                c.token(req)
                if req.done_s is None:
                    self.running.append(req)
        self.running = [r for r in self.running if r.done_s is None]
        self._boundary()

    def _end_run(self, generation: int) -> None:
        if generation != self._generation:
            return
        start, a, _, k, batch = self._run
        self._run = None
        for req in batch:
            self.cluster.tokens(req, k, second_token_s=start + a)
        self.running = [r for r in self.running if r.done_s is None]
        self._boundary()

    def local_load(self) -> tuple[QueuedPrefill, ...]:
        return tuple(QueuedPrefill(str(r.index), r.prompt_tokens - r.num_prefilled,
                                   self.local_started.get(r.index)) for r in self.local_queue)


class Cluster:
    def __init__(self, spec: ClusterSpec, calibration: Calibration, policy: Policy):
        self.spec, self.calibration, self.policy = spec, calibration, policy
        self.cost = calibration.cost
        self.loop = EventLoop()
        self.prefill: dict[str, PrefillSim] = {}
        for pool in spec.pools:
            for i in range(pool.num_replicas):
                rid = f"{pool.name}/{i}"
                self.prefill[rid] = PrefillSim(self, rid, pool)
        self.decode = {f"decode/{i}": DecodeSim(self, f"decode/{i}")
                       for i in range(spec.num_decode)}
        self.requests: list[SimRequest] = []

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        self.requests = requests
        for req in requests:
            delay = self.calibration.overhead.seconds(req.prompt_tokens)
            self.loop.at(req.arrival_s + delay, self._route, req)
        self.loop.run()
        return requests

    def _route(self, req: SimRequest) -> None:
        req.routed_s = self.loop.now
        plan = self.policy.route(req, self)
        if isinstance(plan, Rejection):
            req.status = plan.status
            return
        req.path = plan.path
        decode = req.decode = self.decode[plan.decode_replica_id]
        if plan.path == LOCAL:
            decode.call(decode.reserve, req, decode.local_queue.append)
        else:
            prefill = self.prefill[plan.prefill_replica_id]
            prefill.routed[req.index] = req
            decode.call(decode.reserve, req, prefill.submit)

    def token(self, req: SimRequest) -> None:
        self.tokens(req, 1, self.loop.now)

    def tokens(self, req: SimRequest, num: int, second_token_s: float) -> None:
        """``num`` tokens of ``req`` end now (the first of them at ``second_token_s`` if it
        is the request's second token)."""
        now = self.loop.now
        if req.num_tokens == 0:
            req.first_token_s = now
        if req.num_tokens <= 1 < req.num_tokens + num:
            req.second_token_s = second_token_s if req.num_tokens == 1 else now
        req.num_tokens += num
        if req.num_tokens >= req.output_tokens:
            req.done_s = now
            # Blocks are freed by a call on the decode engine (between its steps).
            req.decode.call(req.decode.release, req)
