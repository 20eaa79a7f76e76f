"""Run one simulation and summarize it with the load generator's definitions (TTFT from
arrival to token 0, TPOT = (e2e - ttft) / (output_tokens - 1), percentiles by linear
interpolation, throughput = completed / (last completion - first arrival))."""

from __future__ import annotations

import numpy as np

from benchmarks.loadgen.report import stats
from benchmarks.loadgen.workload import WorkItem
from benchmarks.simulator.cluster import Cluster, ClusterSpec, Policy, SimRequest
from benchmarks.simulator.costs import Calibration


def simulate(spec: ClusterSpec, calibration: Calibration, policy: Policy,
             items: list[WorkItem]) -> list[SimRequest]:
    requests = [SimRequest(w.index, w.arrival_s or 0.0, w.prompt_tokens, w.output_tokens)
                for w in items]
    return Cluster(spec, calibration, policy).run(requests)


def summary(requests: list[SimRequest]) -> dict:
    done = [r for r in requests if r.done_s is not None]
    row = {"num_requests": len(requests), "completed": len(done),
           "rejected": sum(r.status != 200 for r in requests)}
    if done:
        span = max(r.done_s for r in done) - min(r.arrival_s for r in requests)
        row["throughput_rps"] = len(done) / span if span > 0 else float("inf")
        row["local_fraction"] = float(np.mean([r.path == "local" for r in done]))
    row.update(stats([r.ttft_s for r in done], "ttft"))
    row.update(stats([r.tpot_s for r in done], "tpot"))
    row.update(stats([r.done_s - r.arrival_s for r in done], "e2el"))
    return row


def prefill_utilisation(cluster_busy_s: float, num_replicas: int, span_s: float) -> float:
    return cluster_busy_s / (num_replicas * span_s) if span_s > 0 else 0.0
