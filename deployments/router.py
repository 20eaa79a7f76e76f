"""The Serve request router of prefill and decode (``RequestRouterConfig``), and the
autoscaling policy on the same queue signal.

``DisaggRequestRouter`` sees the replicas' reports with the replicas (``update_replicas``)
and publishes them on this process's board (``deployments/load.py``). ``choose_replicas``
sends a call to the replica its ``RoutePlan`` names (the plan travels in the call's
arguments); without a plan, or if that replica is gone, it ranks the replicas by least
expected finish: the report, plus what this router sent and has not seen finish
(``InFlightLedger``, fed by ``on_request_routed`` / ``on_request_completed``).
Serve runs routers on a loop of their own (another thread): the ledger locks. Serve ships this
module's classes by value, so every piece of shared state is reached through another module.
"""

from __future__ import annotations

import threading

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments import load
from disagg.routing import InFlightLedger, QueuedPrefill, RoutePlan

PREFILL, DECODE = "prefill", "decode"


def find_plan(pending_request: PendingRequest | None) -> RoutePlan | None:
    if pending_request is None:
        return None
    for value in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(value, RoutePlan):
            return value
    return None


def _request_of(pending_request: PendingRequest) -> tuple[str, int]:
    """The engine request's id and prompt length (the call's ``EngineRequest`` argument)."""
    for value in pending_request.args:
        n = getattr(value, "num_prompt_tokens", None)
        if isinstance(n, int) and isinstance(getattr(value, "request_id", None), str):
            return value.request_id, n
    return pending_request.metadata.internal_request_id, 0


class DisaggRequestRouter(RequestRouter):
    """Sends each call where its plan says; otherwise to the replica of least expected finish.

    ``request_router_kwargs``: ``deployment`` (its name, the board's key) and ``role``
    (``prefill`` or ``decode``).
    """

    def initialize_state(self, deployment: str = "", role: str = PREFILL, **kwargs):
        self._deployment = deployment
        self._role = role
        self._lock = threading.Lock()
        self._ledger = InFlightLedger()
        self._request_ids: dict[str, tuple[str, str]] = {}  # internal id -> (replica, request)

    def update_replicas(self, replicas: list[RunningReplica]):
        super().update_replicas(replicas)
        with self._lock:
            self._ledger.forget_replicas(r.replica_id.unique_id for r in replicas)
        load.BOARD.publish(self._deployment, {r.replica_id.unique_id: dict(r.routing_stats or {})
                                         for r in replicas})

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        plan = find_plan(pending_request)
        target = None if plan is None else (
            plan.prefill_replica_id if self._role == PREFILL else plan.decode_replica_id)
        ranked = sorted(candidate_replicas, key=self._expected_work_s)
        first = [r for r in ranked if r.replica_id.unique_id == target]
        return [[r] for r in first + [r for r in ranked if r not in first]]

    def _expected_work_s(self, replica: RunningReplica) -> tuple[float, int]:
        """Prefill: queued prompt tokens (report + own sends; every replica of a deployment
        runs at one speed, so tokens order them as seconds would). Decode: most free KV
        blocks first. Then this router's own calls in flight break ties between reports."""
        rid = replica.replica_id.unique_id
        stats = replica.routing_stats or {}
        with self._lock:
            in_flight = self._ledger.num_in_flight(rid)
            if self._role == DECODE:
                return -float(stats.get("free_blocks", 0)), in_flight
            queue = self._ledger.view(rid, load.queue_from_wire(stats.get("queue", ())),
                                      float(stats.get("at", 0.0)))
        return float(sum(q.num_tokens for q in queue)), in_flight

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        rid = replica_id.unique_id
        internal = pending_request.metadata.internal_request_id
        request_id, num_tokens = _request_of(pending_request)
        with self._lock:
            self._request_ids[internal] = (rid, request_id)
            self._ledger.sent(rid, QueuedPrefill(request_id, num_tokens))

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        with self._lock:
            found = self._request_ids.pop(internal_request_id, None)
            if found is not None:
                self._ledger.finished(found[0], found[1], self._get_curr_time_s())


class LoadAutoscalingPolicy:
    """Serve autoscaling policy (``autoscaling_config.policy``) on the replicas' ``load``
    metric (``record_autoscaling_stats``): prefill reports its queued prefill in seconds (the
    router's queue signal), decode the share of its KV blocks or sequence slots in use.
    Desired replicas = total load / ``target`` per replica; Serve applies min/max and delays."""

    def __init__(self, target: float):
        self._target = target

    def __call__(self, ctx) -> tuple[float, dict]:
        loads = (ctx.aggregated_metrics or {}).get("load")
        if not loads:  # no report yet: keep the current target
            return ctx.target_num_replicas, {}
        return sum(loads.values()) / self._target, {}
