"""The routing policy: one pure function from (request, load snapshot) to a plan or a refusal.

Public interface (the Serve app and the cluster simulator both call it; keep it stable):

- ``RequestSummary``: what the policy knows of a request (id, prompt tokens, tokens to generate).
- ``QueuedPrefill``: one prompt queued or running on a replica (``started_at`` set once its
  forward began), ``LoadSnapshot`` = ``now`` + every ``PrefillPoolLoad`` (name, SP degree,
  attention config, its ``PrefillReplicaLoad``s) + every ``DecodeReplicaLoad`` (free/total KV
  blocks, running sequences, its own local-prefill queue).
- ``RoutingSettings``: mode (``auto | local | remote``), the admission bounds
  (``max_queue_wait_s``, per-role ``QueueBounds`` in requests and tokens), the decode stall
  bound, the KV bytes per token and backend.
- ``CostModel`` (``disagg/cost_model.py``): seconds of prefill / decode step / transfer.
- ``route(request, load, cost, settings) -> RoutePlan | Rejection``.
- ``InFlightLedger``: what a router has sent and not yet seen finish; ``view`` merges it with a
  replica's (older) report. ``ReplicaQueue``: a replica's own FIFO bookkeeping for its reports.
No Ray and no clock in here: time comes in as ``LoadSnapshot.now`` / ``now`` arguments.

How ``route`` decides (every estimate from the cost model and the queues):
1. Decode replica: among live replicas, those whose free blocks hold the prompt and its
   generation first; then the one whose next decode step is cheapest (fewest running
   sequences, least KV held); then the most free blocks.
2. Options: LOCAL on that replica -- admissible only while its prefill would pause the decode
   batch at most ``max_decode_stall_s`` -- and, for each prefill pool whose length bucket
   holds the prompt (``bucket_bounds``: the smallest SP degree whose prefill meets
   ``sp_target_prefill_s``; it spills to a larger pool only when its own would not finish it
   within that target, never to a smaller one), the replica of least expected finish (queued work in seconds + this prompt). Each option's expected time to the
   second token: wait + prefill (+ hop + exposed KV transfer when remote) + one decode step.
3. Admission: an option is open while its wait before the prefill starts is at most
   ``max_queue_wait_s`` and its queue is within its role's bounds. The cheapest open option
   wins. None open: ``Rejection(429)`` with ``retry_after_s`` = when the first option opens as
   its queue drains. No live decode replica (or, forced remote, no live prefill replica):
   ``Rejection(503)``.
``mode = local | remote`` (or a fixed ``local_max_tokens``) forces the path; replica choice and
admission stay as above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from disagg.cost_model import CostModel

LOCAL, DISAGGREGATED = "local", "disaggregated"
Mode = Literal["auto", "local", "remote"]


@dataclass(frozen=True)
class RequestSummary:
    request_id: str
    num_prompt_tokens: int
    max_new_tokens: int = 1


@dataclass(frozen=True)
class QueuedPrefill:
    request_id: str
    num_tokens: int
    started_at: float | None = None  # its forward began (snapshot clock); None: still waiting


@dataclass(frozen=True)
class PrefillReplicaLoad:
    replica_id: str
    queue: tuple[QueuedPrefill, ...] = ()  # in the order the replica runs them


@dataclass(frozen=True)
class PrefillPoolLoad:
    name: str
    replicas: tuple[PrefillReplicaLoad, ...]
    sp: int = 1  # sequence-parallel degree of every replica of the pool
    triangle_fraction: float = 0.0  # share of its layers prefilled with Triangle attention


@dataclass(frozen=True)
class DecodeReplicaLoad:
    replica_id: str
    num_free_blocks: int
    num_total_blocks: int
    block_size: int = 16
    num_running: int = 0  # sequences holding KV here (decoding or about to)
    max_num_seqs: int = 256
    local_queue: tuple[QueuedPrefill, ...] = ()  # prompts this replica prefills itself


@dataclass(frozen=True)
class LoadSnapshot:
    now: float
    prefill_pools: tuple[PrefillPoolLoad, ...]
    decode_replicas: tuple[DecodeReplicaLoad, ...]


@dataclass(frozen=True)
class QueueBounds:
    max_queued_requests: int = 64  # prompts waiting ahead (the one running included)
    max_queued_tokens: int = 1 << 20  # their tokens; an empty queue takes any prompt


@dataclass(frozen=True)
class RoutingSettings:
    mode: Mode = "auto"
    local_max_tokens: int | None = None  # fixed threshold instead of the cost model
    max_queue_wait_s: float = 30.0
    max_decode_stall_s: float = 1.0  # longest pause a local prefill may put in decode's batch
    sp_target_prefill_s: float = 2.0  # buckets: the smallest SP degree meeting this
    prefill_bounds: QueueBounds = field(default_factory=QueueBounds)
    decode_bounds: QueueBounds = field(default_factory=QueueBounds)  # its local prefills
    kv_bytes_per_token: int = 0
    kv_backend: str | None = None  # the transfer priced for remote prefill (None: preferred)


@dataclass(frozen=True)
class RoutePlan:
    path: str  # LOCAL or DISAGGREGATED
    decode_replica_id: str
    prefill_pool: str | None = None
    prefill_replica_id: str | None = None
    expected_wait_s: float = 0.0  # before its prefill starts
    expected_prefill_s: float = 0.0  # the work it adds to the chosen queue
    expected_ttst_s: float = 0.0  # time to the second token
    reason: str = ""


@dataclass(frozen=True)
class Rejection:
    status: int  # 429: every queue is over its bound; 503: no replica of a role is alive
    retry_after_s: int
    message: str
    role: str  # "prefill" / "decode"


def remaining_s(queue: Iterable[QueuedPrefill], now: float, seconds_of) -> list[float]:
    """Seconds each queued prompt still needs, in queue order (a running one has done part)."""
    out = []
    for item in queue:
        s = seconds_of(item.num_tokens)
        if item.started_at is not None:
            s = max(0.0, s - max(0.0, now - item.started_at))
        out.append(s)
    return out


def time_until_open(queue: Sequence[QueuedPrefill], remaining: Sequence[float],
                    num_tokens: int, bounds: QueueBounds, max_wait_s: float) -> float:
    """Seconds until a prompt of ``num_tokens`` would be admitted to this queue, as it drains
    in order (0: admitted now)."""
    tokens = sum(q.num_tokens for q in queue)
    elapsed, k = 0.0, 0
    while k < len(queue):
        waiting = len(queue) - k
        fits = waiting < bounds.max_queued_requests and tokens + num_tokens <= \
            bounds.max_queued_tokens
        if fits and sum(remaining[k:]) <= max_wait_s:
            break
        elapsed += remaining[k]
        tokens -= queue[k].num_tokens
        k += 1
    return elapsed


def bucket_bounds(pools: Sequence[PrefillPoolLoad], cost: CostModel,
                  settings: RoutingSettings, max_tokens: int = 1 << 24) -> dict[str, int]:
    """Each pool's smallest prompt (its bucket starts there): the first length at which every
    pool of smaller SP degree misses ``sp_target_prefill_s``. The smallest-SP pool starts at 0."""
    ordered = sorted(pools, key=lambda p: p.sp)
    starts = {}
    for i, pool in enumerate(ordered):
        if i == 0:
            starts[pool.name] = 0
            continue
        smaller = ordered[i - 1]

        def misses(n: int, p=smaller) -> bool:
            return cost.prefill_s(n, triangle_fraction=p.triangle_fraction, sp=p.sp) > \
                settings.sp_target_prefill_s

        lo, hi = 0, max_tokens  # prefill time grows with n: bisect for the first miss
        if not misses(hi):
            starts[pool.name] = max_tokens
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if not misses(mid) else (lo, mid)
        starts[pool.name] = max(lo, starts[smaller.name])
    return starts


def choose_decode(request: RequestSummary, replicas: Sequence[DecodeReplicaLoad],
                  cost: CostModel) -> DecodeReplicaLoad | None:
    """The decode replica for ``request``: fits its KV, cheapest next step, most free blocks."""
    def key(r: DecodeReplicaLoad):
        need = math.ceil((request.num_prompt_tokens + request.max_new_tokens) / r.block_size)
        fits = need <= r.num_free_blocks and r.num_running < r.max_num_seqs
        held = (r.num_total_blocks - r.num_free_blocks) * r.block_size
        step = cost.decode_step_s(r.num_running + 1, held + request.num_prompt_tokens)
        return (not fits, step, -r.num_free_blocks, r.replica_id)

    return min(replicas, key=key) if replicas else None


@dataclass(frozen=True)
class _Option:
    plan: RoutePlan
    open_in_s: float  # 0: admissible now


def _local_option(request, decode, now, cost, settings, forced: bool) -> _Option | None:
    n = request.num_prompt_tokens
    prefill_s = cost.prefill_s(n)
    if not forced and prefill_s > settings.max_decode_stall_s:
        return None
    rem = remaining_s(decode.local_queue, now, cost.prefill_s)
    wait = sum(rem)
    held = (decode.num_total_blocks - decode.num_free_blocks) * decode.block_size
    ttst = wait + prefill_s + cost.decode_step_s(decode.num_running + 1, held + n)
    plan = RoutePlan(LOCAL, decode.replica_id, expected_wait_s=wait,
                     expected_prefill_s=prefill_s, expected_ttst_s=ttst,
                     reason=f"local: prefill {prefill_s:.3g} s after {wait:.3g} s queued")
    open_in = time_until_open(decode.local_queue, rem, n, settings.decode_bounds,
                              settings.max_queue_wait_s)
    return _Option(plan, open_in)


def _remote_options(request, decode, load, cost, settings) -> list[_Option]:
    n = request.num_prompt_tokens
    starts = bucket_bounds(load.prefill_pools, cost, settings)
    alive = [p for p in load.prefill_pools if p.replicas]
    # The prompt's own bucket is the largest start <= n among live pools. It spills to a
    # larger pool (never a smaller one) only when no replica of its own would finish it
    # within the target (or its own pool has no live replica).
    own = max((starts[p.name] for p in alive if starts[p.name] <= n), default=None)
    options = _pool_options(request, decode, load, cost, settings,
                            [p for p in alive if starts[p.name] == own])
    if all(o.open_in_s > 0 or o.plan.expected_wait_s + o.plan.expected_prefill_s >
           settings.sp_target_prefill_s for o in options):
        options += _pool_options(request, decode, load, cost, settings,
                                 [p for p in alive if starts[p.name] > n])
    return options


def _pool_options(request, decode, load, cost, settings, pools) -> list[_Option]:
    n = request.num_prompt_tokens
    held = (decode.num_total_blocks - decode.num_free_blocks) * decode.block_size
    tail = cost.transfer_s(n * settings.kv_bytes_per_token, settings.kv_backend) + \
        cost.decode_step_s(decode.num_running + 1, held + n)
    options = []
    for pool in pools:
        def seconds_of(tokens: int, p=pool) -> float:
            return cost.prefill_s(tokens, triangle_fraction=p.triangle_fraction, sp=p.sp)

        prefill_s = seconds_of(n)
        for replica in pool.replicas:
            rem = remaining_s(replica.queue, load.now, seconds_of)
            wait = sum(rem)
            ttst = cost.remote_overhead_s + wait + prefill_s + tail
            plan = RoutePlan(DISAGGREGATED, decode.replica_id, pool.name, replica.replica_id,
                             wait, prefill_s, ttst,
                             f"remote: pool {pool.name} (sp {pool.sp}), prefill "
                             f"{prefill_s:.3g} s after {wait:.3g} s queued")
            open_in = time_until_open(replica.queue, rem, n, settings.prefill_bounds,
                                      settings.max_queue_wait_s)
            options.append(_Option(plan, open_in))
    return options


def route(request: RequestSummary, load: LoadSnapshot, cost: CostModel,
          settings: RoutingSettings) -> RoutePlan | Rejection:
    """Where ``request`` runs, or why it is refused now (see the module docstring)."""
    decode = choose_decode(request, load.decode_replicas, cost)
    if decode is None:
        return Rejection(503, 1, "no decode replica is alive", "decode")
    has_prefill = any(p.replicas for p in load.prefill_pools)
    mode = settings.mode
    if mode == "auto" and settings.local_max_tokens is not None:
        mode = "local" if request.num_prompt_tokens < settings.local_max_tokens else "remote"
    if mode == "remote" and not has_prefill:
        return Rejection(503, 1, "no prefill replica is alive", "prefill")
    options: list[_Option] = []
    if mode != "remote":
        # Forced local, or no prefill replica alive: decode prefills whatever the length.
        local = _local_option(request, decode, load.now, cost, settings,
                              forced=mode == "local" or not has_prefill)
        if local is not None:
            options.append(local)
    if mode != "local":
        options += _remote_options(request, decode, load, cost, settings)
    if not options:  # over the stall bound and no pool's bucket: decode prefills it
        options.append(_local_option(request, decode, load.now, cost, settings, forced=True))
    admissible = [o for o in options if o.open_in_s <= 0.0]
    if admissible:
        return min(admissible, key=lambda o: o.plan.expected_ttst_s).plan
    soonest = min(options, key=lambda o: o.open_in_s)
    role = "decode" if soonest.plan.path == LOCAL else "prefill"
    retry = max(1, math.ceil(soonest.open_in_s))
    return Rejection(429, retry, f"the {role} queues are full: expected wait "
                                 f"{soonest.plan.expected_wait_s:.1f} s exceeds "
                                 f"{settings.max_queue_wait_s:g} s or the queue bound; "
                                 f"retry in {retry} s", role)


def local_threshold_tokens(decode: DecodeReplicaLoad, load: LoadSnapshot, cost: CostModel,
                           settings: RoutingSettings, max_tokens: int = 1 << 20) -> int:
    """The shortest prompt ``route`` would not prefill on ``decode`` under ``load`` (it goes
    remote, or is refused), for tests, logs and the simulator; ``max_tokens`` if none up to
    it."""
    snapshot = replace(load, decode_replicas=(decode,))

    def remote(n: int) -> bool:
        plan = route(RequestSummary("probe", n), snapshot, cost, settings)
        return not (isinstance(plan, RoutePlan) and plan.path == LOCAL)

    lo, hi = 1, max_tokens
    if not remote(hi):
        return max_tokens
    while lo < hi:  # remote(n) is monotone in n for a fixed snapshot
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not remote(mid) else (lo, mid)
    return lo


class InFlightLedger:
    """Prompts a router has sent to replicas and not yet seen finish.

    Replica reports arrive every few seconds, so between two reports the router's own sends
    are the freshest load it has. ``view`` = the replica's report, less what this router has
    seen finish since, plus what this router sent that the report does not list yet.
    """

    def __init__(self):
        self._sent: dict[str, dict[str, QueuedPrefill]] = {}  # replica -> id -> item
        self._sent_at: dict[str, float] = {}  # id -> when sent (for ``expire``)
        self._finished: dict[str, dict[str, float]] = {}  # replica -> id -> when

    def sent(self, replica_id: str, item: QueuedPrefill, now: float | None = None) -> None:
        self._sent.setdefault(replica_id, {})[item.request_id] = item
        if now is not None:
            self._sent_at[item.request_id] = now

    def expire(self, now: float, max_age_s: float) -> None:
        """Forget sends older than ``max_age_s`` whose end this router never saw (a caller
        that vanished): no request outlives its timeout, so none of them still runs."""
        for book in self._sent.values():
            for rid in [r for r in book if now - self._sent_at.get(r, now) > max_age_s]:
                del book[rid]
                del self._sent_at[rid]
        for finished in self._finished.values():  # of replicas that stopped reporting
            for rid in [r for r, t in finished.items() if now - t > max_age_s]:
                del finished[rid]

    def finished(self, replica_id: str, request_id: str, now: float) -> None:
        self._sent_at.pop(request_id, None)
        if self._sent.get(replica_id, {}).pop(request_id, None) is not None:
            self._finished.setdefault(replica_id, {})[request_id] = now

    def num_in_flight(self, replica_id: str) -> int:
        return len(self._sent.get(replica_id, {}))

    def view(self, replica_id: str, reported: Sequence[QueuedPrefill],
             reported_at: float) -> tuple[QueuedPrefill, ...]:
        finished = self._finished.get(replica_id, {})
        for rid in [r for r, t in finished.items() if t < reported_at]:
            del finished[rid]  # that report was taken after it finished: it is not listed
        listed = {q.request_id for q in reported}
        mine = [q for rid, q in self._sent.get(replica_id, {}).items() if rid not in listed]
        return tuple(q for q in reported if q.request_id not in finished) + tuple(mine)

    def forget_replicas(self, alive: Iterable[str]) -> None:
        keep = set(alive)
        for book in (self._sent, self._finished):
            for replica_id in [r for r in book if r not in keep]:
                del book[replica_id]


class ReplicaQueue:
    """A replica's own FIFO of prompts to prefill, for its routing-stats report.

    The replica runs them in arrival order, so the head started when it arrived or when the
    one before it finished, whichever is later.
    """

    def __init__(self):
        self._items: dict[str, QueuedPrefill] = {}
        self._head_since: float | None = None

    def add(self, request_id: str, num_tokens: int, now: float) -> None:
        if not self._items:
            self._head_since = now
        self._items[request_id] = QueuedPrefill(request_id, num_tokens)

    def done(self, request_id: str, now: float) -> None:
        was_head = next(iter(self._items), None) == request_id
        if self._items.pop(request_id, None) is not None and was_head:
            self._head_since = now

    def items(self) -> tuple[QueuedPrefill, ...]:
        out = list(self._items.values())
        if out:
            out[0] = replace(out[0], started_at=self._head_since)
        return tuple(out)

    @property
    def num_tokens(self) -> int:
        return sum(q.num_tokens for q in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
