"""What the routers know of the load: replica reports, this process's board of them, and
the ingress's ``LoadBook`` that turns them (and its own plans in flight) into a
``LoadSnapshot`` for ``disagg.routing.route``.

1. Each PrefillServer / DecodeServer replica answers Serve's ``record_routing_stats`` with a
   small report (``prefill_report`` / ``decode_report``) built from counters on its event
   loop: it never waits behind a prefill or an engine step. Serve's controller polls it every
   ``routing.stats_period_s`` and pushes it to every router of the deployment.
2. The routers (``deployments/router.py``) publish what they receive on ``BOARD``, one per
   process. Serve ships a router class by value, so the router reaches the board through
   this module (``load.BOARD``), never a copy of its own.
3. ``LoadBook``: a planned prompt counts on its prefill (or local) queue until its first
   token, and its KV blocks on its decode replica until it ends.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from disagg.cost_model import CostModel
from disagg.routing import (
    DecodeReplicaLoad,
    InFlightLedger,
    LoadSnapshot,
    PrefillPoolLoad,
    PrefillReplicaLoad,
    QueuedPrefill,
    ReplicaQueue,
    RoutePlan,
    remaining_s,
)

UNKNOWN_REPLICA = ""  # a deployment that reports no load


def _queue_wire(queue: Sequence[QueuedPrefill]) -> list[list]:
    return [[q.request_id, q.num_tokens, q.started_at] for q in queue]


def queue_from_wire(rows) -> tuple[QueuedPrefill, ...]:
    return tuple(QueuedPrefill(str(r), int(n), None if s is None else float(s))
                 for r, n, s in rows)


def prefill_report(queue: ReplicaQueue, now: float,
                   measured: Sequence[tuple[int, int, float]] = ()) -> dict:
    """A prefill replica's routing stats: its FIFO of prompts (the running one first), and its
    latest measured prefills as (sequence number, prompt tokens, seconds)."""
    return {"at": now, "queue": _queue_wire(queue.items()),
            "measured": [list(m) for m in measured]}


def decode_report(*, now: float, num_free_blocks: int, num_total_blocks: int, block_size: int,
                  max_num_seqs: int, active_ids: Sequence[str], local_queue: ReplicaQueue
                  ) -> dict:
    """A decode replica's routing stats: KV blocks, the requests it holds, its local prefills."""
    return {"at": now, "free_blocks": num_free_blocks, "total_blocks": num_total_blocks,
            "block_size": block_size, "max_num_seqs": max_num_seqs,
            "active": list(active_ids), "local_queue": _queue_wire(local_queue.items())}


class LoadBoard:
    """The latest report of every live replica of each deployment, as this process's routers
    last received them (deployment name -> replica id -> report)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, dict]] = {}

    def publish(self, deployment: str, reports: dict[str, dict]) -> None:
        with self._lock:
            self._reports[deployment] = dict(reports)

    def reports(self, deployment: str) -> dict[str, dict] | None:
        """None until a router of ``deployment`` exists in this process."""
        with self._lock:
            found = self._reports.get(deployment)
            return None if found is None else dict(found)


BOARD = LoadBoard()


class LoadBook:
    """The ingress's view of the load: the board's reports merged with its own plans in flight.

    A planned prompt counts on its prefill (or local) queue until its first token arrives, and
    its KV blocks on its decode replica until it ends.
    """

    def __init__(self, pools: dict[str, tuple[str, int, float]], decode_deployment: str,
                 max_age_s: float = 3600.0):
        self._pools = pools  # pool name -> (deployment, sp, triangle fraction)
        self._decode = decode_deployment
        self._max_age_s = max_age_s  # the request timeout: no plan in flight is older
        self._lock = threading.Lock()
        self._prefill = InFlightLedger()
        self._local = InFlightLedger()
        self._blocks = InFlightLedger()  # num_tokens = prompt + max new tokens
        self._measured_seen: dict[str, int] = {}  # replica -> last measurement taken

    def planned(self, plan: RoutePlan, request_id: str, num_prompt_tokens: int,
                num_new_tokens: int, now: float) -> None:
        with self._lock:
            item = QueuedPrefill(request_id, num_prompt_tokens)
            if plan.prefill_replica_id is not None:
                self._prefill.sent(plan.prefill_replica_id, item, now)
            else:
                self._local.sent(plan.decode_replica_id, item, now)
            self._blocks.sent(plan.decode_replica_id,
                              QueuedPrefill(request_id, num_prompt_tokens + num_new_tokens), now)

    def first_token(self, plan: RoutePlan, request_id: str, now: float) -> None:
        with self._lock:
            if plan.prefill_replica_id is not None:
                self._prefill.finished(plan.prefill_replica_id, request_id, now)
            else:
                self._local.finished(plan.decode_replica_id, request_id, now)

    def ended(self, plan: RoutePlan, request_id: str, now: float) -> None:
        self.first_token(plan, request_id, now)
        with self._lock:
            self._blocks.finished(plan.decode_replica_id, request_id, now)

    def new_prefill_measurements(self) -> list[tuple[str, int, float]]:
        """(pool, prompt tokens, seconds) of the prefills replicas measured since last asked
        (each replica numbers its own; a report repeats the latest few)."""
        out = []
        with self._lock:
            for name, (deployment, _, _) in self._pools.items():
                for rid, stats in _reports(deployment):
                    seen = self._measured_seen.get(rid, 0)
                    for seq, tokens, seconds in stats.get("measured", ()):
                        if seq > seen:
                            out.append((name, int(tokens), float(seconds)))
                            self._measured_seen[rid] = max(self._measured_seen.get(rid, 0),
                                                           seq)
        return out

    def snapshot(self, now: float) -> LoadSnapshot:
        pools = []
        with self._lock:
            for ledger in (self._prefill, self._local, self._blocks):
                ledger.expire(now, self._max_age_s)
            for name, (deployment, sp, fraction) in self._pools.items():
                replicas = tuple(
                    PrefillReplicaLoad(rid, self._prefill.view(
                        rid, queue_from_wire(s.get("queue", ())), float(s.get("at", 0.0))))
                    for rid, s in _reports(deployment))
                pools.append(PrefillPoolLoad(name, replicas, sp, fraction))
            decode = tuple(self._decode_load(rid, s) for rid, s in _reports(self._decode))
        return LoadSnapshot(now, tuple(pools), decode)

    def _decode_load(self, rid: str, stats: dict) -> DecodeReplicaLoad:
        at = float(stats.get("at", 0.0))
        block_size = int(stats.get("block_size", 16))
        reported_ids = [QueuedPrefill(r, 0) for r in stats.get("active", ())]
        held = self._blocks.view(rid, reported_ids, at)
        unreported = [q for q in held if q.num_tokens > 0]  # planned here, not in the report
        free = int(stats.get("free_blocks", 0)) - sum(
            math.ceil(q.num_tokens / block_size) for q in unreported)
        local = self._local.view(rid, queue_from_wire(stats.get("local_queue", ())), at)
        return DecodeReplicaLoad(rid, max(0, free), int(stats.get("total_blocks", 0)),
                                 block_size, len(held), int(stats.get("max_num_seqs", 256)),
                                 local)


def _reports(deployment: str) -> list[tuple[str, dict]]:
    """A deployment's replica reports, by replica id. A deployment whose router is not ours
    (a test's own server class, say) has no board entry: one replica of unknown load stands
    for it, and Serve's router picks the real one."""
    reports = BOARD.reports(deployment)
    if reports is None:  # no report will ever come: only the ingress's own plans count
        return [(UNKNOWN_REPLICA, {"at": math.inf})]
    return sorted(reports.items())


def queue_seconds(queue: Sequence[QueuedPrefill], now: float, cost: CostModel, *,
                  sp: int = 1, triangle_fraction: float = 0.0) -> float:
    """The work of a queue in seconds (the autoscaling signal, the same the router uses)."""
    return sum(remaining_s(queue, now, lambda n: cost.prefill_s(
        n, triangle_fraction=triangle_fraction, sp=sp)))
