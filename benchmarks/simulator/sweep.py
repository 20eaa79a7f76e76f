"""Simulator-only studies on H200 costs (random Llama-3.1-8B, TriangleMix layers 16-31):

- ``routing``: length-aware (``disagg.routing``) vs round robin (fixed threshold, then
  power-of-two choice) vs always-remote on one arrival trace (80% of prompts 1-4K tokens, 20%
  32-128K) on 4 prefill + 4 decode GPUs at a fixed rate -> ``routing.json``.
- ``cluster``: 8 to 256 GPUs, P:D split, SP degree and arrival rate on the long-context
  workload (prompts lognormal around 16K, 10% at 128K), the best configuration per SLO, and
  the projected TTFT of a 1M-token prompt -> ``simulator_sweep.json``.

    python -m benchmarks.simulator.sweep routing|cluster [--plot-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.loadgen.workload import parse_lengths, synthetic
from benchmarks.simulator import costs
from benchmarks.simulator.cluster import ClusterSpec, PoolSpec
from benchmarks.simulator.policies import AlwaysRemote, LengthAware, RoundRobin
from benchmarks.simulator.run import simulate, summary
from disagg.routing import RoutingSettings

ROUTING_TRACE = "mix:0.8*uniform:1024:4096,0.2*uniform:32768:130048"
LONG_CONTEXT = "mix:0.9*lognormal:16384:0.8:512:130048,0.1*fixed:130048"
OUTPUTS = "uniform:64:256"
H200_KV_TOKENS = 880_000  # ~110 GiB of KV per decode H200 after weights and activations
LOCAL_THRESHOLD = 4096  # prefill_decode_1gpu.yaml's local_prefill_max_tokens
# p90 of this workload sits on the 10% of 128K prompts, so the SLOs bound the median (the
# typical ~16K prompt) and p99 (the 128K ones); TPOT bounds the decode side.
SLOS = ({"name": "p50<=1s,p99<=5s", "ttft_p50_s": 1.0, "ttft_p99_s": 5.0, "tpot_p90_s": 0.05},
        {"name": "p50<=2s,p99<=15s", "ttft_p50_s": 2.0, "ttft_p99_s": 15.0, "tpot_p90_s": 0.05},
        {"name": "p50<=3s,p99<=30s", "ttft_p50_s": 3.0, "ttft_p99_s": 30.0, "tpot_p90_s": 0.1})


def h200_cluster(num_prefill: int, num_decode: int, sp: int = 1, link: str = "nvlink"
                 ) -> ClusterSpec:
    pool = PoolSpec(f"sp{sp}", sp, num_prefill, costs.LLAMA8B_TRIANGLE_FRACTION)
    return ClusterSpec((pool,), num_decode=num_decode, link=link,
                       decode_kv_tokens=H200_KV_TOKENS, max_num_seqs=64)


def h200_calibration() -> costs.Calibration:
    """Component costs plus the served path's share measured at concurrency 1 on the H200
    (``serve_1gpu_isolated.json``: at ac6a22f no extra time inside prefill, ~26 ms outside)."""
    isolated = RESULTS_DIR / "serve_1gpu_isolated.json"
    cal = costs.h200_llama8b()
    if not isolated.exists():
        return cal
    records = [r for row in json.loads(isolated.read_text())["rows"] for r in row["requests"]]
    return costs.with_served_corrections(cal, records, isolated.name)


def routing_settings(calibration: costs.Calibration) -> RoutingSettings:
    return RoutingSettings(kv_bytes_per_token=calibration.kv_bytes_per_token, kv_backend="nvlink")


def routing_study(args) -> list[dict]:
    cal = h200_calibration()
    items = synthetic(args.num_requests, parse_lengths(ROUTING_TRACE), parse_lengths(OUTPUTS),
                      rate=args.rate, seed=args.seed)
    spec = h200_cluster(4, 4)
    rows = []
    for policy in (LengthAware(routing_settings(cal)), RoundRobin(LOCAL_THRESHOLD, args.seed),
                   AlwaysRemote(args.seed)):
        reqs = simulate(spec, cal, policy, items)
        s = summary(reqs)
        short = summary([r for r in reqs if r.prompt_tokens <= 4096])
        long_ = summary([r for r in reqs if r.prompt_tokens > 4096])
        rows.append({"policy": policy.name, "workload": ROUTING_TRACE, "source": "simulator",
                     "cluster": "4 prefill + 4 decode H200 (sp 1, nvlink)",
                     "arrival_rate": args.rate, "num_requests": s["num_requests"],
                     "completed": s["completed"], "rejected": s["rejected"],
                     "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"],
                     "ttft_mean_s": s["ttft_mean_s"], "throughput_rps": s["throughput_rps"],
                     "tpot_p50_s": s["tpot_p50_s"], "tpot_p99_s": s["tpot_p99_s"],
                     "local_fraction": s["local_fraction"],
                     "short_ttft_p99_s": short["ttft_p99_s"],
                     "long_ttft_p99_s": long_["ttft_p99_s"]})
    return rows


def configs(num_gpus: int) -> list[tuple[int, int, int]]:
    """(prefill groups, SP degree, decode GPUs) with half to seven eighths of the GPUs on
    prefill, every group whole."""
    out = []
    for sp in (1, 2, 4, 8):
        for frac in (0.5, 0.75, 0.875):
            prefill_gpus = int(num_gpus * frac) // sp * sp
            decode = num_gpus - prefill_gpus
            if prefill_gpus >= sp and decode >= 1:
                out.append((prefill_gpus // sp, sp, decode))
    return sorted(set(out))


def cluster_study(args) -> tuple[list[dict], dict]:
    cal = h200_calibration()
    prompt, output = parse_lengths(LONG_CONTEXT), parse_lengths(OUTPUTS)
    rows = []
    for g in args.sizes:
        for num_prefill, sp, num_decode in configs(g):
            for per_gpu in sorted(args.rates_per_gpu):
                rate = per_gpu * g
                n = min(args.max_requests,
                        max(args.min_requests, math.ceil(rate * args.horizon_s)))
                items = synthetic(n, prompt, output, rate=rate, seed=args.seed)
                t0 = time.perf_counter()
                s = summary(simulate(h200_cluster(num_prefill, num_decode, sp), cal,
                                     LengthAware(routing_settings(cal)), items))
                row = {"num_gpus": g, "num_prefill_groups": num_prefill, "sp": sp,
                       "num_decode": num_decode, "arrival_rate": rate, "num_requests": n,
                       "completed": s["completed"], "rejected": s["rejected"],
                       "ttft_p50_s": s["ttft_p50_s"], "ttft_p90_s": s["ttft_p90_s"],
                       "ttft_p99_s": s["ttft_p99_s"], "tpot_p90_s": s["tpot_p90_s"],
                       "throughput_rps": s.get("throughput_rps"),
                       "sim_wall_s": time.perf_counter() - t0}
                rows.append(row)
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
                if row["rejected"] or (row["ttft_p99_s"] or 0) > max(x["ttft_p99_s"]
                                                                       for x in SLOS):
                    break  # past every SLO already: higher rates only get worse
    projection = {f"sp{sp}": cal.prefill_s(1 << 20, sp=sp,
                                           triangle_fraction=cal.triangle_fraction)
                  for sp in (1, 2, 4, 8)}
    return rows, projection


def best_per_slo(rows: list[dict]) -> list[dict]:
    """Per cluster size and SLO: the configuration sustaining the highest arrival rate with
    none rejected and TTFT p50 / p99 and TPOT p90 within the SLO. Every SLO bounds the median:
    past capacity the backlog reaches every request, so p50 leaves the bound within a run
    (a completions-over-span throughput test cannot tell: the last requests' drain weighs on
    short runs)."""
    best = []
    for g in sorted({r["num_gpus"] for r in rows}):
        for slo in SLOS:
            ok = [r for r in rows if r["num_gpus"] == g and r["rejected"] == 0
                  and r["ttft_p99_s"] is not None and r["ttft_p50_s"] <= slo["ttft_p50_s"]
                  and r["ttft_p99_s"] <= slo["ttft_p99_s"]
                  and (r["tpot_p90_s"] or 0.0) <= slo["tpot_p90_s"]]
            top = max(ok, key=lambda r: (r["arrival_rate"], -r["ttft_p99_s"]), default=None)
            best.append({"num_gpus": g, "slo": slo["name"], **(
                {k: top[k] for k in ("num_prefill_groups", "sp", "num_decode", "arrival_rate",
                                     "ttft_p50_s", "ttft_p99_s", "tpot_p90_s")} if top else
                {"arrival_rate": None})})
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=("routing", "cluster"))
    p.add_argument("--rate", type=float, default=4.0, help="routing: req/s")
    p.add_argument("--num-requests", type=int, default=1500, help="routing")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--rates-per-gpu", type=float, nargs="+", default=[0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    p.add_argument("--horizon-s", type=float, default=60.0, help="cluster: arrivals span")
    p.add_argument("--min-requests", type=int, default=400)
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-dir", type=Path, default=None)
    p.add_argument("--rows-from", type=Path, default=None,
                   help="cluster: take the rows of an earlier run, recompute the rest")
    add_provenance_args(p)
    args = p.parse_args(argv)
    if args.study == "routing":
        rows = routing_study(args)
        out = args.out or RESULTS_DIR / "routing.json"
        kept = []  # other workloads' rows (the CPU app's, benchmarks.routing_cpu) stay
        if out.exists():
            kept = [r for r in json.loads(out.read_text())["rows"]
                    if r.get("workload") != ROUTING_TRACE]
        path = write_results("routing", rows + kept, commit=args.commit, dirty=args.dirty,
                             out=out, extra={"calibration": list(h200_calibration().sources)})
        print_table(rows, ["policy", "ttft_p50_s", "ttft_p99_s", "throughput_rps", "rejected",
                           "short_ttft_p99_s", "long_ttft_p99_s", "local_fraction"])
        if args.plot_dir is not None:
            from benchmarks.simulator.plots import plot_routing

            print(f"plot: {plot_routing(rows, args.plot_dir)}")
    else:
        if args.rows_from is not None:
            previous = json.loads(args.rows_from.read_text())
            rows, projection = previous["rows"], previous["projected_1m_ttft_s"]
            args.commit = args.commit or previous["commit"]
        else:
            rows, projection = cluster_study(args)
        best = best_per_slo(rows)
        path = write_results("simulator_sweep", rows, commit=args.commit, dirty=args.dirty,
                             out=args.out, extra={"workload": LONG_CONTEXT, "outputs": OUTPUTS,
                                                  "best_per_slo": best,
                                                  "projected_1m_ttft_s": projection})
        print_table(best, ["num_gpus", "slo", "num_prefill_groups", "sp", "num_decode",
                           "arrival_rate", "ttft_p50_s", "ttft_p99_s"])
        print("projected 1M-token TTFT (s):", {k: round(v, 1) for k, v in projection.items()})
        if args.plot_dir is not None:
            from benchmarks.simulator.plots import plot_sweep

            for plot in plot_sweep(rows, best, args.plot_dir):
                print(f"plot: {plot}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
