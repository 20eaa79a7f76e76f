"""The routing policy (``disagg.routing.route``) on synthetic load snapshots: no Ray, no clock."""

from __future__ import annotations

import dataclasses
import math

import pytest

from disagg.cost_model import CostModel, DecodeCost, ModelShape, PrefillCost, TransferCost
from disagg.routing import (
    DISAGGREGATED,
    LOCAL,
    DecodeReplicaLoad,
    InFlightLedger,
    LoadSnapshot,
    PrefillPoolLoad,
    PrefillReplicaLoad,
    QueueBounds,
    QueuedPrefill,
    Rejection,
    ReplicaQueue,
    RequestSummary,
    RoutePlan,
    RoutingSettings,
    bucket_bounds,
    local_threshold_tokens,
    route,
)

SHAPE = ModelShape(30, 576, 1536, 9, 3, 64)
# 1 ms per token, a small quadratic term: a 1,000-token prompt takes ~1.1 s.
COST = CostModel(PrefillCost(0.01, 1e-3, 1e-7), DecodeCost(0.02, 1e-3, 1e-7),
                 (TransferCost("object_store", 0.005, 1e-10),), 0.05, SHAPE)
SETTINGS = RoutingSettings(max_queue_wait_s=30.0, max_decode_stall_s=0.5,
                           kv_bytes_per_token=SHAPE.kv_bytes_per_token)
NOW = 1000.0


def decode(rid="d0", free=10_000, total=10_000, running=0, local=()) -> DecodeReplicaLoad:
    return DecodeReplicaLoad(rid, free, total, 16, running, 256, tuple(local))


def pool(*queues, name="sp1", sp=1) -> PrefillPoolLoad:
    return PrefillPoolLoad(name, tuple(PrefillReplicaLoad(f"{name}-p{i}", tuple(q))
                                       for i, q in enumerate(queues)), sp)


def snapshot(pools=None, decodes=None) -> LoadSnapshot:
    return LoadSnapshot(NOW, tuple(pools if pools is not None else [pool((), ())]),
                        tuple(decodes if decodes is not None else [decode()]))


def plan_of(n, load=None, cost=COST, settings=SETTINGS, max_new=16) -> RoutePlan | Rejection:
    return route(RequestSummary("r", n, max_new), load or snapshot(), cost, settings)


def test_short_prompts_stay_local_long_go_remote():
    assert plan_of(20).path == LOCAL
    long = plan_of(4000)
    assert long.path == DISAGGREGATED and long.prefill_pool == "sp1"


def test_long_prompt_avoids_the_busy_replica():
    busy = [QueuedPrefill("a", 8000, started_at=NOW - 1.0), QueuedPrefill("b", 4000)]
    plan = plan_of(4000, snapshot([pool(busy, ())]))
    assert plan.prefill_replica_id == "sp1-p1" and plan.expected_wait_s == 0.0
    # Least expected finish, not fewest requests: one huge prompt outweighs two small ones.
    small = [QueuedPrefill("c", 500), QueuedPrefill("d", 500)]
    plan = plan_of(4000, snapshot([pool([QueuedPrefill("e", 20_000)], small)]))
    assert plan.prefill_replica_id == "sp1-p1"


def test_a_running_prompt_counts_only_what_is_left_of_it():
    nearly_done = [QueuedPrefill("a", 10_000, started_at=NOW - 20.0)]  # ~20 s, 20 s ago
    fresh = [QueuedPrefill("b", 3000)]
    plan = plan_of(4000, snapshot([pool(nearly_done, fresh)]))
    assert plan.prefill_replica_id == "sp1-p0"


def test_local_threshold_moves_with_the_cost_model_and_the_queues():
    d = decode()
    base = local_threshold_tokens(d, snapshot(), COST, SETTINGS)
    assert plan_of(base - 1).path == LOCAL and plan_of(base).path == DISAGGREGATED
    half = dataclasses.replace(COST, prefill=PrefillCost(0.005, 5e-4, 5e-8))
    assert local_threshold_tokens(d, snapshot(), half, SETTINGS) > base  # faster: more local
    # Decode's own queue of local prefills makes the remote path win earlier.
    queued = decode(local=[QueuedPrefill("q", 400)])
    assert local_threshold_tokens(queued, snapshot(decodes=[queued]), COST, SETTINGS) < base
    # And a busy prefill pool keeps more prompts local (up to the stall bound).
    busy = snapshot([pool([QueuedPrefill("x", 2000)])])
    below_bound = local_threshold_tokens(decode(), busy, COST, SETTINGS)
    assert below_bound >= base
    assert COST.prefill_s(below_bound - 1) <= SETTINGS.max_decode_stall_s


def test_bucket_boundaries_follow_the_cost_model():
    pools = [pool((), name="sp1", sp=1), pool((), name="sp4", sp=4)]
    starts = bucket_bounds(pools, COST, SETTINGS)
    assert starts["sp1"] == 0
    boundary = starts["sp4"]
    # The first length sp1 cannot prefill within the target.
    assert COST.prefill_s(boundary - 1) <= SETTINGS.sp_target_prefill_s < COST.prefill_s(boundary)
    slower = dataclasses.replace(COST, prefill=PrefillCost(0.01, 2e-3, 2e-7))
    assert bucket_bounds(pools, slower, SETTINGS)["sp4"] < boundary
    load = snapshot(pools)
    assert plan_of(boundary - 1, load).prefill_pool == "sp1"
    assert plan_of(boundary, load).prefill_pool == "sp4"
    assert plan_of(boundary - 1, load, cost=slower).prefill_pool == "sp4"


def test_a_busy_small_pool_spills_to_a_larger_one_not_the_reverse():
    pools = [pool([QueuedPrefill("x", 20_000)], name="sp1", sp=1), pool((), name="sp4", sp=4)]
    n = bucket_bounds(pools, COST, SETTINGS)["sp4"] - 100  # sp1's bucket
    assert plan_of(n, snapshot(pools)).prefill_pool == "sp4"
    # Its own pool has no live replica: the larger one takes it.
    pools = [PrefillPoolLoad("sp1", (), 1), pool((), name="sp4", sp=4)]
    assert plan_of(n, snapshot(pools)).prefill_pool == "sp4"
    # A long prompt waits for its own (busy) pool rather than hog the small one.
    pools = [pool((), name="sp1", sp=1), pool([QueuedPrefill("y", 20_000)], name="sp4", sp=4)]
    long = bucket_bounds(pools, COST, SETTINGS)["sp4"] + 100
    plan = plan_of(long, snapshot(pools))
    assert plan.prefill_pool == "sp4" and plan.expected_wait_s > SETTINGS.sp_target_prefill_s


def test_decode_replica_chosen_by_free_blocks_and_running_sequences():
    decodes = [decode("a", free=2000), decode("b", free=9000), decode("c", free=5000)]
    assert plan_of(20, snapshot(decodes=decodes)).decode_replica_id == "b"
    assert plan_of(4000, snapshot(decodes=decodes)).decode_replica_id == "b"
    # The most free blocks cannot hold this prompt: the one that can wins.
    tight = [decode("a", free=100), decode("b", free=300, running=40)]
    assert plan_of(3000, snapshot(decodes=tight)).decode_replica_id == "b"
    # Equal blocks: fewer running sequences make the cheaper decode step.
    equal = [decode("a", free=5000, running=30), decode("b", free=5000, running=2)]
    assert plan_of(20, snapshot(decodes=equal)).decode_replica_id == "b"


def test_router_in_flight_counts_break_ties_between_reports():
    ledger = InFlightLedger()
    report = (QueuedPrefill("old", 1000, started_at=NOW - 0.1),)
    ledger.sent("p0", QueuedPrefill("mine", 2000), NOW - 0.5)  # after p0's last report

    def load():
        return snapshot([PrefillPoolLoad("sp1", tuple(
            PrefillReplicaLoad(r, ledger.view(r, report, NOW - 1.0)) for r in ("p0", "p1")))])

    assert [q.request_id for q in load().prefill_pools[0].replicas[0].queue] == ["old", "mine"]
    assert plan_of(4000, load()).prefill_replica_id == "p1"  # the reports alone tie
    ledger.finished("p0", "mine", NOW)
    ledger.sent("p1", QueuedPrefill("mine2", 3000), NOW)
    assert plan_of(4000, load()).prefill_replica_id == "p0"


def test_ledger_hides_what_it_saw_finish_until_a_newer_report():
    ledger = InFlightLedger()
    ledger.sent("p", QueuedPrefill("x", 100), 0.0)
    stale = (QueuedPrefill("x", 100, started_at=1.0),)
    assert [q.request_id for q in ledger.view("p", stale, 1.0)] == ["x"]  # no duplicate
    ledger.finished("p", "x", 5.0)
    assert ledger.view("p", stale, 4.0) == ()  # the report predates the finish
    assert ledger.view("p", (), 6.0) == ()
    ledger.sent("p", QueuedPrefill("y", 1), 10.0)
    ledger.finished("q", "never-sent", 10.0)  # nothing to forget
    ledger.sent("q", QueuedPrefill("z", 1), 10.0)
    ledger.finished("q", "z", 11.0)  # replica q never reports again
    ledger.expire(now=100.0, max_age_s=30.0)  # its caller vanished: forgotten
    assert ledger.num_in_flight("p") == 0
    assert ledger.view("q", (QueuedPrefill("z", 1),), 0.0) == (QueuedPrefill("z", 1),)


def test_replica_queue_head_starts_when_the_one_before_finishes():
    q = ReplicaQueue()
    q.add("a", 10, 1.0)
    q.add("b", 20, 2.0)
    assert [(i.request_id, i.started_at) for i in q.items()] == [("a", 1.0), ("b", None)]
    q.done("a", 5.0)
    assert [(i.request_id, i.started_at) for i in q.items()] == [("b", 5.0)]
    q.done("b", 6.0)
    q.add("c", 30, 9.0)
    assert q.items()[0].started_at == 9.0 and len(q) == 1 and q.num_tokens == 30


def test_queue_wait_past_the_bound_is_429_with_retry_after_from_the_queue():
    waits = [QueuedPrefill(f"q{i}", 10_000) for i in range(4)]  # ~20 s each, 80 s in all
    load = snapshot([pool(waits)])
    refused = plan_of(10_000, load)
    assert isinstance(refused, Rejection) and refused.status == 429
    per = COST.prefill_s(10_000)
    # It opens once the queue ahead has drained to at most max_queue_wait_s.
    k = next(k for k in range(5) if (4 - k) * per <= SETTINGS.max_queue_wait_s)
    assert refused.retry_after_s == math.ceil(k * per)
    # The same request is admitted with the queue drained that far.
    assert isinstance(plan_of(10_000, snapshot([pool(waits[k:])])), RoutePlan)
    # A short prompt is still served (decode prefills it), whatever the prefill queue.
    assert plan_of(20, load).path == LOCAL


def test_request_and_token_bounds_refuse_before_the_wait_does():
    settings = dataclasses.replace(SETTINGS, prefill_bounds=QueueBounds(2, 1 << 20))
    queue = [QueuedPrefill("a", 3000, started_at=NOW), QueuedPrefill("b", 3000)]
    refused = plan_of(3000, snapshot([pool(queue)]), settings=settings)
    assert isinstance(refused, Rejection) and refused.status == 429
    assert refused.retry_after_s == math.ceil(COST.prefill_s(3000))  # the head finishing
    tokens = dataclasses.replace(SETTINGS, prefill_bounds=QueueBounds(64, 5000))
    assert isinstance(plan_of(3000, snapshot([pool(queue[:1])]), settings=tokens), Rejection)
    assert isinstance(plan_of(9000, snapshot([pool(())]), settings=tokens), RoutePlan)


def test_503_only_when_no_replica_of_a_role_is_alive():
    refused = plan_of(20, snapshot(decodes=[]))
    assert isinstance(refused, Rejection) and refused.status == 503 and refused.role == "decode"
    no_prefill = snapshot([pool()])  # a pool without replicas
    assert plan_of(4000, no_prefill).path == LOCAL  # decode prefills it rather than fail
    remote = dataclasses.replace(SETTINGS, mode="remote")
    refused = plan_of(4000, no_prefill, settings=remote)
    assert isinstance(refused, Rejection) and refused.status == 503 and refused.role == "prefill"


@pytest.mark.parametrize("mode, n, path", [("local", 4000, LOCAL), ("remote", 20, DISAGGREGATED)])
def test_mode_forces_the_path(mode, n, path):
    assert plan_of(n, settings=dataclasses.replace(SETTINGS, mode=mode)).path == path


def test_fixed_threshold_overrides_the_cost_model():
    fixed = dataclasses.replace(SETTINGS, local_max_tokens=8)
    assert plan_of(7, settings=fixed).path == LOCAL
    assert plan_of(8, settings=fixed).path == DISAGGREGATED
