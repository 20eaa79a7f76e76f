"""Routing policies the simulator runs.

- ``LengthAware``: the real policy, ``disagg.routing.route`` (never a copy), on a snapshot of
  the simulated queues -- exact ones: the simulation has no report lag, which the Serve app
  covers with ``InFlightLedger``.
- ``RoundRobin``: the app's behaviour before the router issue -- a fixed length threshold
  (``local_prefill_max_tokens``), then Serve's default power-of-two choice (two random
  replicas, the one with fewer ongoing requests) among prefill replicas, and among decode.
- ``AlwaysRemote``: every prompt to a prefill replica (power-of-two), as Ray Serve LLM's P/D.
"""

from __future__ import annotations

import random

from benchmarks.simulator.cluster import DISAGGREGATED, LOCAL, Cluster, SimRequest
from disagg.routing import (
    DecodeReplicaLoad,
    LoadSnapshot,
    PrefillPoolLoad,
    PrefillReplicaLoad,
    Rejection,
    RequestSummary,
    RoutePlan,
    RoutingSettings,
    route,
)


def snapshot(cluster: Cluster) -> LoadSnapshot:
    pools = []
    for spec in cluster.spec.pools:
        replicas = tuple(PrefillReplicaLoad(r.replica_id, r.load())
                         for r in cluster.prefill.values() if r.pool.name == spec.name)
        pools.append(PrefillPoolLoad(spec.name, replicas, spec.sp, spec.triangle_fraction))
    decodes = tuple(DecodeReplicaLoad(
        d.replica_id, d.num_free_blocks, d.num_total_blocks, cluster.spec.block_size,
        num_running=d.num_held + len(d.reserving), max_num_seqs=cluster.spec.max_num_seqs,
        local_queue=d.local_load()) for d in cluster.decode.values())
    return LoadSnapshot(cluster.loop.now, tuple(pools), decodes)


class LengthAware:
    name = "length_aware"

    def __init__(self, settings: RoutingSettings):
        self.settings = settings

    def route(self, request: SimRequest, cluster: Cluster) -> RoutePlan | Rejection:
        summary = RequestSummary(str(request.index), request.prompt_tokens,
                                 request.output_tokens)
        return route(summary, snapshot(cluster), cluster.cost, self.settings)


def _power_of_two(rng: random.Random, items: list, load) -> object:
    if len(items) == 1:
        return items[0]
    a, b = rng.sample(items, 2)
    return a if load(a) <= load(b) else b


class RoundRobin:
    """A fixed threshold, then power-of-two choice (Serve's default router)."""

    name = "round_robin"

    def __init__(self, local_max_tokens: int, seed: int = 0):
        self.local_max_tokens = local_max_tokens
        self.rng = random.Random(seed)

    def _decode(self, cluster: Cluster) -> str:
        decodes = list(cluster.decode.values())
        return _power_of_two(self.rng, decodes, lambda d: d.num_held).replica_id

    def route(self, request: SimRequest, cluster: Cluster) -> RoutePlan:
        decode = self._decode(cluster)
        if request.prompt_tokens < self.local_max_tokens or not cluster.prefill:
            return RoutePlan(LOCAL, decode, reason="below the fixed threshold")
        prefill = _power_of_two(self.rng, list(cluster.prefill.values()),
                                lambda p: p.num_outstanding)
        return RoutePlan(DISAGGREGATED, decode, prefill.pool.name, prefill.replica_id,
                         reason="power of two choices")


class AlwaysRemote(RoundRobin):
    name = "always_remote"

    def __init__(self, seed: int = 0):
        super().__init__(local_max_tokens=0, seed=seed)
