"""The cluster simulator against queueing theory: M/M/1 and M/D/1 closed forms, determinism
for a seed, and doubling the prefill replicas halving the queueing of a burst."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.loadgen.workload import WorkItem, parse_lengths, synthetic
from benchmarks.simulator.cluster import ClusterSpec, PoolSpec
from benchmarks.simulator.costs import Calibration, Overhead
from benchmarks.simulator.policies import AlwaysRemote, LengthAware, RoundRobin
from benchmarks.simulator.run import simulate, summary
from disagg.cost_model import CostModel, DecodeCost, ModelShape, PrefillCost, TransferCost
from disagg.routing import QueueBounds, RoutingSettings

SECONDS_PER_TOKEN = 1e-4  # a prompt of 10K tokens is one second of prefill


def _calibration(decode_step_s: float = 0.0) -> Calibration:
    cost = CostModel(PrefillCost(0.0, SECONDS_PER_TOKEN, 0.0), DecodeCost(decode_step_s, 0, 0),
                     (TransferCost("cuda_ipc", 0.0, 0.0),), remote_overhead_s=0.0,
                     shape=ModelShape(2, 64, 128, 4, 2, 16))
    return Calibration(cost, Overhead(0.0, 0.0), 128, 0.0, ("test",))


def _remote_settings() -> RoutingSettings:
    unbounded = QueueBounds(max_queued_requests=1 << 30, max_queued_tokens=1 << 60)
    return RoutingSettings(mode="remote", max_queue_wait_s=math.inf,
                           prefill_bounds=unbounded, decode_bounds=unbounded)


def _poisson(n: int, rate: float, prompt_tokens: np.ndarray, seed: int) -> list[WorkItem]:
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    return [WorkItem(i, float(t[i]), int(prompt_tokens[i]), 1) for i in range(n)]


def _single_server_mean_ttft(items: list[WorkItem]) -> float:
    spec = ClusterSpec((PoolSpec("p"),), num_decode=1)
    row = summary(simulate(spec, _calibration(), AlwaysRemote(seed=0), items))
    assert row["completed"] == len(items)
    return row["ttft_mean_s"]


# Seeds are fixed (the runs are deterministic); tolerances cover the sampling error of 40K
# requests at these loads (it grows as 1 / (1 - rho)^2): a biased queue still fails.
@pytest.mark.parametrize("rho", [0.5, 0.7])
def test_mm1_mean_sojourn(rho):
    """Exponential prefill times (1 s mean), Poisson arrivals: W = 1 / (mu - lambda)."""
    n = 40000
    lengths = np.maximum(1, np.rint(np.random.default_rng(7).exponential(10000, n)))
    mean_service = lengths.mean() * SECONDS_PER_TOKEN
    mu = 1 / mean_service
    lam = rho * mu
    w = _single_server_mean_ttft(_poisson(n, lam, lengths, seed=3))
    assert w == pytest.approx(1 / (mu - lam), rel=0.06 if rho > 0.6 else 0.04)


@pytest.mark.parametrize("rho", [0.5, 0.7])
def test_md1_mean_sojourn(rho):
    """Fixed prefill time s: W = s + rho * s / (2 (1 - rho)) (Pollaczek-Khinchine)."""
    n = 40000
    s = 1.0
    w = _single_server_mean_ttft(_poisson(n, rho / s, np.full(n, 10000), seed=5))
    assert w == pytest.approx(s + rho * s / (2 * (1 - rho)), rel=0.04 if rho > 0.6 else 0.03)


def test_deterministic_for_a_seed():
    items = synthetic(300, parse_lengths("mix:0.8*uniform:1000:4000,0.2*uniform:32768:131072"),
                      parse_lengths("uniform:1:8"), rate=0.5, seed=11)
    spec = ClusterSpec((PoolSpec("p", num_replicas=2),), num_decode=2)

    def once(seed):
        reqs = simulate(spec, _calibration(decode_step_s=0.01), RoundRobin(4096, seed=seed),
                        items)
        return [(r.first_token_s, r.done_s, r.path) for r in reqs]

    assert once(1) == once(1)
    assert once(1) != once(2)  # the power-of-two choices do depend on the seed


def test_runs_of_decode_steps_equal_step_by_step():
    """A batch's unchanged steps simulated as one run (cut where a call arrives) give the
    same token times as simulating every step."""
    items = synthetic(200, parse_lengths("mix:0.7*uniform:100:3000,0.3*uniform:8000:30000"),
                      parse_lengths("uniform:1:40"), rate=2.0, seed=4)
    cal = _calibration(decode_step_s=0.01)
    cal = replace(cal, cost=replace(cal.cost, decode=DecodeCost(0.01, 0.002, 1e-7)))

    def times(step_runs: bool):
        spec = ClusterSpec((PoolSpec("p", num_replicas=2),), num_decode=2, step_runs=step_runs)
        reqs = simulate(spec, cal, RoundRobin(2048, seed=0), items)
        return [(r.first_token_s, r.second_token_s, r.done_s) for r in reqs]

    fast, slow = times(True), times(False)
    assert all(x is not None for t in slow for x in t[:1])
    assert np.allclose(np.array(fast, dtype=float), np.array(slow, dtype=float), rtol=0,
                       atol=1e-9, equal_nan=True)


def test_doubling_prefill_replicas_halves_queueing_of_a_burst():
    """N equal prompts at once on P replicas (the real policy balances them): the mean wait
    before prefill is (N/P - 1)/2 prefill times, so 2P replicas wait half as long (+ s/2)."""
    n, s = 512, 1.0
    items = [WorkItem(i, 0.0, 10000, 1) for i in range(n)]
    waits = {}
    for p in (2, 4):
        spec = ClusterSpec((PoolSpec("p", num_replicas=p),), num_decode=1,
                           decode_kv_tokens=n * 10016)  # every reservation fits at once
        reqs = simulate(spec, _calibration(), LengthAware(_remote_settings()), items)
        wait = np.mean([r.prefill_start_s - r.arrival_s for r in reqs])
        assert wait == pytest.approx((n / p - 1) / 2 * s, rel=1e-9)
        waits[p] = wait
    assert (waits[4] + s / 2) / (waits[2] + s / 2) == pytest.approx(0.5, rel=1e-9)


def _shared_gpu_run(contention, shared_gpu: bool = True):
    """One decoding request (3,000 steps of 10 ms from t=0) and, from t=1 s, one remote
    prefill of 2 s on the same GPU."""
    from benchmarks.simulator.costs import Contention

    cal = _calibration(decode_step_s=0.01)
    if contention is not None:
        cal = replace(cal, contention=Contention(*contention))
    items = [WorkItem(0, 0.0, 10, 3000), WorkItem(1, 1.0, 20000, 1)]
    spec = ClusterSpec((PoolSpec("p"),), num_decode=1, shared_gpu=shared_gpu)
    decoding, prefilled = simulate(spec, cal, RoundRobin(1000, seed=0), items)
    assert (decoding.path, prefilled.path) == ("local", "disaggregated")
    return decoding, prefilled


def test_shared_gpu_contention_slows_each_side_by_its_factor():
    """A prefill overlapped by decode steps throughout runs at 1 / prefill_slowdown of its
    speed (2 s -> 4 s at 2x); the steps meanwhile take decode_slowdown x longer, so the
    decoding request ends 4 s x (1 - 1/1.5) later than with unslowed steps."""
    _, prefilled = _shared_gpu_run((2.0, 1.0))
    assert prefilled.ttft_s == pytest.approx(4.0, abs=0.02)
    plain, _ = _shared_gpu_run((2.0, 1.0))
    slowed, prefilled_slowed = _shared_gpu_run((2.0, 1.5))
    assert prefilled_slowed.ttft_s == pytest.approx(4.0, abs=0.02)
    assert slowed.done_s - plain.done_s == pytest.approx(4.0 * (1 - 1 / 1.5), abs=0.03)


def test_shared_gpu_without_contention_is_between_none_and_serialized():
    """Factors of 1 are the unshared GPU exactly; no measured contention keeps the serialized
    bound (the prefill waits out every overlapping step: here, the whole 30 s of decode)."""
    _, unshared = _shared_gpu_run(None, shared_gpu=False)
    _, ones = _shared_gpu_run((1.0, 1.0))
    _, measured = _shared_gpu_run((1.3, 1.1))
    _, serialized = _shared_gpu_run(None)
    assert ones.ttft_s == pytest.approx(unshared.ttft_s, abs=1e-9)
    assert unshared.ttft_s == pytest.approx(2.0, abs=0.02)
    assert unshared.ttft_s < measured.ttft_s < serialized.ttft_s
    assert serialized.ttft_s == pytest.approx(30.0 - 1.0 + 2.0, abs=0.05)


def test_load_contention_reads_the_benchmark_file(tmp_path):
    import json

    from benchmarks.simulator.costs import load_contention

    assert load_contention(tmp_path) is None
    (tmp_path / "contention.json").write_text(json.dumps(
        {"benchmark": "contention", "commit": "abc", "mode": "process", "rows": [],
         "slowdown": {"prefill": 1.25, "decode": 0.97}}))
    found = load_contention(tmp_path)
    assert (found.prefill_slowdown, found.decode_slowdown) == (1.25, 1.0)  # noise clamped
    assert "process" in found.source
