"""Simulated vs measured TTFT on the end-to-end runs of ``e2e_session`` (never used for
calibration): each measured run's own arrival times and prompt lengths are replayed in the
simulator, calibrated from component costs only, and mean / p90 TTFT compared (the issue's
bar: within 15% on the mean, 25% on p90).

    python -m benchmarks.simulator.validate [--results-dir benchmarks/results]

The simulated cluster is the app as it ran (its YAML at the measured commit): one prefill and
one decode replica, routed by that YAML's fixed ``local_prefill_max_tokens`` (the runs of
49151ac: every prompt above it) or, for later commits, by ``disagg.routing`` with its
``routing`` settings. Where ``contention.json`` exists (``benchmarks/contention.py`` on the
GPU), the 1gpu setup is replayed with prefill and decode sharing the GPU at its measured
slowdowns. Writes
``benchmarks/results/simulator_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.simulator import costs
from benchmarks.simulator.cluster import Cluster, ClusterSpec, PoolSpec, SimRequest
from benchmarks.simulator.policies import LengthAware, RoundRobin
from disagg.routing import RoutingSettings

_GIB = 1 << 30
MEAN_TOLERANCE, P90_TOLERANCE = 0.15, 0.25


def _app_args(yaml_path: str, commit: str) -> dict:
    """The YAML's ``args`` at the commit the measured run came from (the file moves on)."""
    try:
        text = subprocess.run(["git", "show", f"{commit}:{yaml_path}"], capture_output=True,
                              text=True, check=True, cwd=RESULTS_DIR).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path(yaml_path).read_text()
    return yaml.safe_load(text)["applications"][0]["args"]


def cluster_for(setup: str, calibration: costs.Calibration, commit: str
                ) -> tuple[ClusterSpec, object]:
    """The app of ``setup`` at ``commit`` as a simulated cluster, and its routing: the YAML's
    fixed ``local_prefill_max_tokens`` where it has one (the app before the router), else
    ``disagg.routing`` with the YAML's ``routing`` settings."""
    args = _app_args("deployments/prefill_decode.yaml" if setup == "cpu"
                     else "deployments/prefill_decode_1gpu.yaml", commit)
    kv_tokens = int(args["decode"]["kv_cache_gib"] * _GIB) // calibration.kv_bytes_per_token
    spec = ClusterSpec((PoolSpec("prefill", 1, 1, calibration.triangle_fraction),),
                       num_decode=1, link="object_store" if setup == "cpu" else "cuda_ipc",
                       decode_kv_tokens=kv_tokens)
    threshold = args.get("local_prefill_max_tokens")
    if threshold is not None:
        return spec, RoundRobin(threshold)
    routing = args.get("routing") or {}
    settings = RoutingSettings(
        mode=routing.get("mode", "auto"),
        max_queue_wait_s=routing.get("max_queue_wait_s", 30.0),
        max_decode_stall_s=routing.get("max_decode_stall_s", 1.0),
        kv_bytes_per_token=calibration.kv_bytes_per_token, kv_backend=spec.link)
    return spec, LengthAware(settings)


def _requests(path: Path) -> list[dict]:
    """Every per-request record of a load-generator results file."""
    return [r for row in json.loads(path.read_text())["rows"] for r in row["requests"]]


def calibration_for(setup: str, results: Path, corrected: bool = True) -> costs.Calibration:
    """Component costs (+, with ``corrected``, the serving layer's share from the isolated
    requests of ``serve_<setup>_isolated.json``)."""
    if setup == "1gpu":
        cal = costs.h200_llama8b(RESULTS_DIR)
    else:
        cal = costs.from_calibration(results / "sim_calibration_cpu.json", [(0, 0.0), (1, 0.0)])
    if not corrected:
        return cal
    isolated = results / f"serve_{setup}_isolated.json"
    return costs.with_served_corrections(cal, _requests(isolated), isolated.name)


def _simulate(setup: str, reqs: list[dict], calibration: costs.Calibration, commit: str,
              shared_gpu: bool = False) -> tuple[Cluster, list[SimRequest]]:
    spec, policy = cluster_for(setup, calibration, commit)
    spec = replace(spec, shared_gpu=shared_gpu)
    sims = [SimRequest(i, r["scheduled_s"], r["server_prompt_tokens"] or r["prompt_tokens"],
                       r["output_tokens"]) for i, r in enumerate(reqs)]
    cluster = Cluster(spec, calibration, policy)
    cluster.run(sims)
    return cluster, sims


def replay(setup: str, row: dict, calibration: costs.Calibration,
           components_only: costs.Calibration, commit: str,
           contention: costs.Contention | None = None) -> dict:
    """One measured run replayed. ``contention`` (``contention.json``): the 1gpu setup's
    prefill and decode share the GPU with these measured slowdowns; without it, that setup
    is replayed as separate GPUs (and, as the other bound, fully serialized)."""
    reqs = [r for r in row["requests"] if r["success"]]
    shared = setup == "1gpu" and contention is not None
    if shared:
        calibration = replace(calibration, contention=contention)
        components_only = replace(components_only, contention=contention)
    cluster, sims = _simulate(setup, reqs, calibration, commit, shared_gpu=shared)
    _, bare = _simulate(setup, reqs, components_only, commit, shared_gpu=shared)
    bare_ttft = np.array([s.ttft_s for s in bare])
    serialized = None
    if setup == "1gpu":  # the other bound: every overlapping decode step delays the prefill
        _, serial = _simulate(setup, reqs, replace(calibration, contention=None), commit,
                              shared_gpu=True)
        serialized = float(np.mean([s.ttft_s for s in serial]))
    measured = np.array([r["ttft_s"] for r in reqs])
    simulated = np.array([s.ttft_s for s in sims])
    span = max(r["start_s"] + r["e2e_s"] for r in reqs) - min(r["start_s"] for r in reqs)
    sim_span = max(s.done_s for s in sims) - min(s.arrival_s for s in sims)
    prefill_busy = sum(r["timing"]["prefill_s"] for r in reqs if r.get("timing"))
    out = {
        "setup": setup, "arrival_rate": row["request_rate"], "num_requests": len(reqs),
        "measured_mean_ttft_s": float(measured.mean()),
        "simulated_mean_ttft_s": float(simulated.mean()),
        "measured_p90_ttft_s": float(np.percentile(measured, 90)),
        "simulated_p90_ttft_s": float(np.percentile(simulated, 90)),
        "measured_prefill_utilisation": prefill_busy / span,
        "simulated_prefill_utilisation": sum(p.busy_s for p in cluster.prefill.values())
        / sim_span,
        "measured_mean_queue_s": float(np.mean([r["timing"]["queue_s"] for r in reqs
                                                if r.get("timing")] or [np.nan])),
        "simulated_mean_queue_s": float(np.mean([s.prefill_start_s - s.routed_s
                                                 for s in sims])),
        "measured_paths": row.get("paths"),
        # The same replay with the component benchmarks alone (no isolated-request share):
        "components_only_mean_ttft_s": float(bare_ttft.mean()),
        "components_only_p90_ttft_s": float(np.percentile(bare_ttft, 90)),
        "serialized_gpu_mean_ttft_s": serialized,
        "shared_gpu_contention": None if not shared else {
            "prefill_slowdown": contention.prefill_slowdown,
            "decode_slowdown": contention.decode_slowdown, "source": contention.source},
    }
    out["mean_error_pct"] = 100 * (out["simulated_mean_ttft_s"] / out["measured_mean_ttft_s"] - 1)
    out["p90_error_pct"] = 100 * (out["simulated_p90_ttft_s"] / out["measured_p90_ttft_s"] - 1)
    out["within_tolerance"] = (abs(out["mean_error_pct"]) <= 100 * MEAN_TOLERANCE
                               and abs(out["p90_error_pct"]) <= 100 * P90_TOLERANCE)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--setups", nargs="+", default=["cpu", "1gpu"])
    p.add_argument("--plot-dir", type=Path, default=None)
    add_provenance_args(p)
    args = p.parse_args(argv)
    rows, calibrations = [], {}
    contention = costs.load_contention(args.results_dir)
    for setup in args.setups:
        measured = args.results_dir / f"serve_{setup}.json"
        if not measured.exists():
            print(f"{setup}: no {measured.name} (not measured)")
            continue
        cal = calibration_for(setup, args.results_dir)
        bare = calibration_for(setup, args.results_dir, corrected=False)
        calibrations[setup] = {"sources": list(cal.sources), "overhead": vars(cal.overhead),
                               "prefill_excess": vars(cal.prefill_excess),
                               "prefill": vars(cal.cost.prefill),
                               "decode": vars(cal.cost.decode)}
        payload = json.loads(measured.read_text())
        for row in payload["rows"]:
            rows.append(replay(setup, row, cal, bare, payload["commit"], contention))
    path = write_results("simulator_validation", rows, commit=args.commit, dirty=args.dirty,
                         out=args.out, extra={"calibrations": calibrations,
                                              "tolerance": {"mean": MEAN_TOLERANCE,
                                                            "p90": P90_TOLERANCE}})
    print_table(rows, ["setup", "arrival_rate", "measured_mean_ttft_s", "simulated_mean_ttft_s",
                       "measured_p90_ttft_s", "simulated_p90_ttft_s",
                       "measured_prefill_utilisation", "within_tolerance"])
    if args.plot_dir is not None and rows:
        from benchmarks.simulator.plots import plot_validation

        print(f"plot: {plot_validation(rows, args.plot_dir)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
