"""The Serve glue without Serve: replica reports on the board become the ingress's snapshot
(merged with its own plans in flight), and the request router sends a call where its plan
says, else by least queued work with its own sends counted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from deployments import load
from deployments.load import UNKNOWN_REPLICA, LoadBook, decode_report, prefill_report
from deployments.router import DECODE, PREFILL, DisaggRequestRouter
from disagg.request import EngineRequest
from disagg.routing import QueuedPrefill, ReplicaQueue, RoutePlan
from disagg.sampling import SamplingParams

NOW = 1000.0


def _decode_stats(free: int, active=(), local=()) -> dict:
    q = ReplicaQueue()
    for rid, n in local:
        q.add(rid, n, NOW - 1)
    return decode_report(now=NOW - 1, num_free_blocks=free, num_total_blocks=1000,
                         block_size=16, max_num_seqs=64, active_ids=active, local_queue=q)


def test_snapshot_merges_reports_with_plans_in_flight():
    q = ReplicaQueue()
    q.add("seen", 500, NOW - 2)
    load.BOARD.publish("Prefill_T", {"p0": prefill_report(q, NOW - 1), "p1": {}})
    load.BOARD.publish("Decode_T", {"d0": _decode_stats(900, active=["seen"])})
    book = LoadBook({"default": ("Prefill_T", 1, 0.0)}, "Decode_T")
    plan = RoutePlan("disaggregated", "d0", "default", "p1")
    book.planned(plan, "new", 320, 80, NOW)  # sent after the reports: 25 blocks
    snap = book.snapshot(NOW)
    p0, p1 = snap.prefill_pools[0].replicas
    assert [q.request_id for q in p0.queue] == ["seen"] and p0.queue[0].started_at == NOW - 2
    assert [q.request_id for q in p1.queue] == ["new"]
    d0 = snap.decode_replicas[0]
    assert d0.num_free_blocks == 900 - 25 and d0.num_running == 2
    book.first_token(plan, "new", NOW + 1)
    assert book.snapshot(NOW + 1).prefill_pools[0].replicas[1].queue == ()
    book.ended(plan, "new", NOW + 2)
    assert book.snapshot(NOW + 2).decode_replicas[0].num_free_blocks == 900


def test_a_deployment_without_our_router_stands_as_one_replica_of_unknown_load():
    book = LoadBook({"default": ("NoSuchPrefill", 1, 0.0)}, "NoSuchDecode")
    snap = book.snapshot(NOW)
    assert [r.replica_id for r in snap.prefill_pools[0].replicas] == [UNKNOWN_REPLICA]
    assert [r.replica_id for r in snap.decode_replicas] == [UNKNOWN_REPLICA]
    load.BOARD.publish("EmptyDecode", {})  # our router, no live replica: none at all
    assert LoadBook({}, "EmptyDecode").snapshot(NOW).decode_replicas == ()


@dataclass(frozen=True)
class FakeReplicaID:
    unique_id: str


@dataclass
class FakeReplica:
    """Test fake of Serve's RunningReplica: an id and its routing stats."""

    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self):
        return FakeReplicaID(self.name)


@dataclass
class FakeMetadata:
    internal_request_id: str


@dataclass
class FakePending:
    """Test fake of Serve's PendingRequest: the call's arguments and metadata."""

    args: list
    kwargs: dict
    metadata: FakeMetadata


def _router(role: str) -> DisaggRequestRouter:
    router = DisaggRequestRouter.__new__(DisaggRequestRouter)  # Serve's __init__ needs Serve
    router.initialize_state(deployment="T", role=role)
    router._get_curr_time_s = lambda: NOW
    return router


def _call(rid: str, n: int, plan: RoutePlan | None = None) -> FakePending:
    request = EngineRequest(rid, tuple(range(n)), SamplingParams(), 4, 0)
    return FakePending([request, b"", None, plan], {}, FakeMetadata(f"internal-{rid}"))


def test_router_follows_the_plan_then_least_work_with_its_own_sends():
    router = _router(PREFILL)
    busy = {"at": NOW - 1, "queue": [["a", 4000, NOW - 1]]}
    replicas = [FakeReplica("r0", busy), FakeReplica("r1", {"at": NOW - 1, "queue": []})]
    ranked = asyncio.run(router.choose_replicas(replicas, _call("x", 100)))
    assert [r[0].name for r in ranked] == ["r1", "r0"]
    plan = RoutePlan("disaggregated", "d0", "default", "r0")
    ranked = asyncio.run(router.choose_replicas(replicas, _call("y", 100, plan)))
    assert ranked[0][0].name == "r0"  # the plan wins over the router's own ranking
    # Its own sends count until they complete: two sent to r1 outweigh r0's report.
    for rid in ("s1", "s2"):
        router.on_request_routed(_call(rid, 3000), FakeReplicaID("r1"), None)
    assert asyncio.run(router.choose_replicas(replicas, _call("z", 100)))[0][0].name == "r0"
    for rid in ("s1", "s2"):
        router.on_request_completed(FakeReplicaID("r1"), f"internal-{rid}")
    assert asyncio.run(router.choose_replicas(replicas, _call("w", 100)))[0][0].name == "r1"


def test_decode_router_prefers_free_blocks_and_its_plan():
    router = _router(DECODE)
    replicas = [FakeReplica("d0", _decode_stats(100)), FakeReplica("d1", _decode_stats(800))]
    assert asyncio.run(router.choose_replicas(replicas, _call("x", 10)))[0][0].name == "d1"
    plan = RoutePlan("local", "d0")
    assert asyncio.run(router.choose_replicas(replicas, _call("y", 10, plan)))[0][0].name == "d0"


def test_reports_round_trip():
    q = ReplicaQueue()
    q.add("a", 7, 1.0)
    q.add("b", 9, 2.0)
    assert load.queue_from_wire(prefill_report(q, 3.0)["queue"]) == (
        QueuedPrefill("a", 7, 1.0), QueuedPrefill("b", 9, None))
