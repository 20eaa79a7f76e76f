"""Routing and admission on the CPU app (SmolLM2-135M, ``deployments/prefill_decode.yaml``).

    python -m benchmarks.routing_cpu            # -> benchmarks/results/routing_cpu.json

1. ``path_ttft`` rows: the same token-id prompts served with ``routing.mode`` forced to
   ``local`` and then to ``remote`` (otherwise the YAML's args): client TTFT per path and
   length, and the disaggregated path's exposed KV transfer (the server's ``disagg_timing``).
   ``benchmarks/fit_cost_model.py`` fits the CPU hop and object-store transfer from them.
2. ``burst`` rows: the YAML app as it ships (``routing: auto``) gets ``--burst`` long prompts
   at once while short prompts keep arriving: how many were admitted, refused with 429 (and
   how fast, with which Retry-After), and how the short ones fared. Every request is counted.

    python -m benchmarks.routing_cpu policies   # -> benchmarks/results/routing_cpu_policies.json

3. ``policy`` rows (``policies``, ``deployments/prefill_decode_cpu_2prefill.yaml``: 2 prefill
   replicas + 1 decode): one arrival trace (80% short, 20% long prompts, Poisson) served by
   each routing policy in turn, rounds interleaved (A B C, then C B A, ...) so the shared
   machine's noise hits all alike; each run is a fresh app on the same Ray instance.
   ``length_aware`` = the YAML (``disagg.routing`` plans path and replica); ``round_robin`` =
   the app before the router: the CPU YAML's old fixed threshold (``local_prefill_max_tokens``
   256) and Serve's default power-of-two router among the prefill replicas;
   ``always_remote`` = ``routing.mode: remote`` with Serve's default router. Measured by the
   load generator (``benchmarks/loadgen``); the rows also go into ``results/routing.json``
   (``source: measured``). ``python -m benchmarks.routing_cpu simulate`` (same options) runs
   the same trace in the cluster simulator (``source: simulator`` rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from benchmarks.common import RESULTS_DIR, add_provenance_args, write_results
from deployments.serve_env import set_process_env

YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefill_decode.yaml"
POLICY_YAML = YAML.with_name("prefill_decode_cpu_2prefill.yaml")
POLICIES = ("length_aware", "round_robin", "always_remote")
ROUND_ROBIN_THRESHOLD = 256  # the CPU YAML's local_prefill_max_tokens before the router


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(n: int, seed: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(n)]


async def _stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                  max_tokens: int) -> dict:
    """One streamed completion: status, path, TTFT, Retry-After, the server's timing."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"prompt_tokens": len(prompt)}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        out["status"] = response.status_code
        out["path"] = response.headers.get("x-disagg-path")
        out["retry_after_s"] = response.headers.get("retry-after")
        if response.status_code != 200:
            await response.aread()
            out["response_s"] = time.perf_counter() - t0
            out["error_code"] = response.json()["error"]["code"]
            return out
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and "ttft_s" not in out:
                out["ttft_s"] = time.perf_counter() - t0
            if chunk.get("usage"):
                out["timing"] = chunk["usage"].get("disagg_timing")
    out["response_s"] = time.perf_counter() - t0
    return out


def _deploy(args: dict, name: str):
    from ray import serve

    from deployments.app import app_builder

    serve.run(app_builder(args), name=name, route_prefix="/")


async def _paths(url: str, model: str, lengths: list[int], repeats: int, path: str) -> list:
    rows = []
    async with httpx.AsyncClient(timeout=600) as client:
        await _stream(client, url, model, _prompt(16, 0), 2)  # warm the route
        for n in lengths:
            runs = [await _stream(client, url, model, _prompt(n, r), 4) for r in range(repeats)]
            assert all(r["status"] == 200 and r["path"] == path for r in runs), runs
            row = {"kind": "path_ttft", "path": path, "prompt_tokens": n, "runs": repeats,
                   "ttft_s": statistics.median(r["ttft_s"] for r in runs)}
            if path == "disaggregated":
                timings = [r["timing"] for r in runs]
                row["kv_bytes"] = timings[0]["kv_bytes"]
                row["transfer_s"] = statistics.median(t["transfer_s"] for t in timings)
                row["server_prefill_s"] = statistics.median(t["prefill_s"] for t in timings)
            rows.append(row)
            print(row, flush=True)
    return rows


async def _burst(url: str, model: str, num_long: int, long_tokens: int, num_short: int,
                 short_every_s: float) -> list:
    limits = httpx.Limits(max_connections=num_long + num_short + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        await _stream(client, url, model, _prompt(16, 0), 2)

        async def shorts():
            out = []
            for i in range(num_short):
                out.append(asyncio.create_task(_stream(client, url, model,
                                                       _prompt(20, 1000 + i), 4)))
                await asyncio.sleep(short_every_s)
            return await asyncio.gather(*out)

        t0 = time.perf_counter()
        longs = [_stream(client, url, model, _prompt(long_tokens, i), 4)
                 for i in range(num_long)]
        long_results, short_results = await asyncio.gather(asyncio.gather(*longs), shorts())
        wall = time.perf_counter() - t0
    rows = []
    for kind, results in (("burst_long", long_results), ("burst_short", short_results)):
        ok = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] == 429]
        rows.append({
            "kind": kind, "prompt_tokens": results[0]["prompt_tokens"], "sent": len(results),
            "completed": len(ok), "refused_429": len(refused),
            "other": sorted({r["status"] for r in results} - {200, 429}),
            "paths": sorted({r["path"] for r in ok}),
            "refusal_response_s_max": max((r["response_s"] for r in refused), default=None),
            "retry_after_s": sorted(int(r["retry_after_s"]) for r in refused),
            "ttft_s_median": statistics.median(r["ttft_s"] for r in ok) if ok else None,
            "ttft_s_max": max((r["ttft_s"] for r in ok), default=None),
            "burst_wall_s": wall})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["policies"]:
        return main_policies(argv[1:])
    if argv[:1] == ["simulate"]:
        return main_simulate(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=60, help="long prompts sent at once")
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--shorts", type=int, default=12)
    parser.add_argument("--short-every-s", type=float, default=1.0)
    add_provenance_args(parser)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    app_args = yaml.safe_load(YAML.read_text())["applications"][0]["args"]
    model = app_args["model"]
    port = _free_port()
    set_process_env()  # what `make serve` gives Serve (deployments/serve_env.py)
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for mode, path in (("local", "local"), ("remote", "disaggregated")):
            forced = {**app_args, "routing": {**app_args.get("routing", {}), "mode": mode}}
            _deploy(forced, f"routing-{mode}")
            rows += asyncio.run(_paths(url, model, args.lengths, args.repeats, path))
            serve.delete(f"routing-{mode}")
        _deploy(app_args, "routing-yaml")
        rows += asyncio.run(_burst(url, model, args.burst, args.long_tokens, args.shorts,
                                   args.short_every_s))
    finally:
        serve.shutdown()
        ray.shutdown()
    write_results("routing_cpu", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                  extra={"config": str(YAML.relative_to(YAML.parents[1])), "cpus": 2,
                         "model": model, "threads": 1})
    return 0


# --- routing policies on one trace (2 prefill replicas) ---------------------------------------

try:  # Serve's default router (power of two choices on the replicas' queue lengths)
    from ray.serve._private.request_router.pow_2_router import (
        PowerOfTwoChoicesRequestRouter as _ServeDefault,
    )
except ImportError:  # pragma: no cover - the module moved
    _ServeDefault = None

if _ServeDefault is not None:
    class ServeDefaultBoardRouter(_ServeDefault):
        """Serve's default router, which also publishes the replicas' reports on this
        process's board (``deployments/load.py``) so the ingress still sees live prefill
        replicas; it ignores the plan's replica (the app before the router)."""

        def initialize_state(self, deployment: str = "", role: str = "prefill", **kwargs):
            import logging

            self._board_deployment = deployment
            logging.getLogger("ray.serve").info(
                "%s: Serve's default power-of-two router (benchmarks.routing_cpu)", deployment)

        def update_replicas(self, replicas):
            super().update_replicas(replicas)
            from deployments import load

            load.BOARD.publish(self._board_deployment,
                               {r.replica_id.unique_id: dict(r.routing_stats or {})
                                for r in replicas})


def policy_args(app_args: dict, policy: str) -> dict:
    """The app's args for ``policy`` (the router class is swapped by ``serve_default_prefill``)."""
    routing = dict(app_args.get("routing", {}))
    if policy == "length_aware":
        return {**app_args, "routing": {**routing, "mode": "auto"}}
    if policy == "round_robin":
        return {**app_args, "routing": {**routing, "mode": "auto"},
                "local_prefill_max_tokens": ROUND_ROBIN_THRESHOLD}
    if policy == "always_remote":
        return {**app_args, "routing": {**routing, "mode": "remote"}}
    raise ValueError(policy)


@contextmanager
def serve_default_prefill(enabled: bool):
    """While building the app: prefill deployments get Serve's default router."""
    from ray.serve.config import RequestRouterConfig

    import deployments.app as app_module

    original = app_module._routing

    def routing(config, settings, deployment, role):
        options = original(config, settings, deployment, role)
        if enabled and role == "prefill":
            options["request_router_config"] = RequestRouterConfig(
                request_router_class=ServeDefaultBoardRouter,
                request_router_kwargs={"deployment": deployment, "role": role},
                request_routing_stats_period_s=config.routing.stats_period_s)
        return options

    app_module._routing = routing
    try:
        yield
    finally:
        app_module._routing = original


def policy_trace(num: int, rate: float, short: str, long: str, long_share: float,
                 output: str, seed: int):
    from benchmarks.loadgen.workload import parse_lengths, synthetic

    spec = f"mix:{1 - long_share:g}*{short},{long_share:g}*{long}"
    return spec, synthetic(num, parse_lengths(spec), parse_lengths(output), rate=rate,
                           seed=seed)


async def _warm(url: str, model: str) -> None:
    """One short (local) and two long (remote) prompts at once: every replica's first call."""
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(_stream(client, url, model, _prompt(24, 7), 2),
                             *(_stream(client, url, model, _prompt(600, 8 + i), 2)
                               for i in range(2)))


def _policy_row(policy: str, round_: int, results: list, items: list, workload: str,
                threshold: int) -> dict:
    from benchmarks.loadgen.report import stats, summarize

    row = {"kind": "policy", "policy": policy, "round": round_, "workload": workload,
           **summarize(results)}
    ok = [r for r in results if r.success]
    for name, sel in (("short", lambda r: r.prompt_tokens < threshold),
                      ("long", lambda r: r.prompt_tokens >= threshold)):
        s = stats([r.ttft_s for r in ok if sel(r)], f"ttft_{name}")
        row.update({k: s[k] for k in (f"ttft_{name}_p50_s", f"ttft_{name}_p99_s")})
    row["ttft_p50_s"], row["ttft_p99_s"] = row["ttft_median_s"], row["ttft_p99_s"]
    row["throughput_rps"] = row["request_throughput_rps"]
    row["requests"] = [r.to_dict() for r in results]
    return row


def _aggregate(rows: list[dict], workload: str) -> list[dict]:
    """Per policy, every round's requests pooled: the routing.json rows."""
    import numpy as np

    out = []
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        if not mine:
            continue
        ttft = [q["ttft_s"] for r in mine for q in r["requests"] if q["success"]]
        sent = sum(r["num_requests"] for r in mine)
        out.append({"policy": policy, "workload": workload, "source": "measured",
                    "rounds": len(mine), "requests": sent, "completed": len(ttft),
                    "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
                    "ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else None,
                    "throughput_rps": float(np.mean([r["throughput_rps"] for r in mine])),
                    "errors_by_status": {k: sum(r["errors_by_status"].get(k, 0) for r in mine)
                                         for k in {k for r in mine
                                                   for k in r["errors_by_status"]}}})
    return out


def merge_routing_json(rows: list[dict], workload: str, path: Path) -> None:
    """Replace ``workload``'s measured rows in ``results/routing.json`` (the simulator's stay)."""
    payload = json.loads(path.read_text())
    payload["rows"] = [r for r in payload["rows"]
                       if not (r.get("workload") == workload and r.get("source") == "measured")]
    payload["rows"] += rows
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _policy_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.routing_cpu {prog}")
    parser.add_argument("--yaml", type=Path, default=POLICY_YAML)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.7, help="req/s (Poisson)")
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--short", default="uniform:32:160")
    parser.add_argument("--long", default="uniform:768:1536")
    parser.add_argument("--long-share", type=float, default=0.2)
    parser.add_argument("--output-len", default="fixed:8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=Path, default=None,
                        help="simulate: engine costs from this sim_calibration_<setup>.json "
                             "(benchmarks.simulator.calibrate on this machine) instead of the "
                             "app's fitted cost model")
    parser.add_argument("--append", action="store_true",
                        help="policies: keep the output file's rows (same workload) and add "
                             "--rounds more rounds after them")
    add_provenance_args(parser)
    return parser


def _trace_of(args, app_args: dict):
    n = max(1, round(args.rate * args.duration_s))
    spec, items = policy_trace(n, args.rate, args.short, args.long, args.long_share,
                               args.output_len, args.seed)
    workload = (f"cpu_2prefill: {spec}, output {args.output_len}, Poisson {args.rate:g} req/s, "
                f"{n} requests")
    return items, workload


def main_simulate(argv: list[str]) -> int:
    """The same trace and policies in the cluster simulator (``source: simulator`` rows of
    ``results/routing.json``), costed by the app's own fitted CPU cost model (this machine's
    component benchmarks, ``disagg/cost_defaults.py``, scaled to the replicas' one thread):
    no serving-layer share and no contention of the engines for the 2 cores."""
    from dataclasses import replace

    from benchmarks.simulator.cluster import ClusterSpec, PoolSpec
    from benchmarks.simulator.costs import Calibration, Overhead
    from benchmarks.simulator.policies import AlwaysRemote, LengthAware, RoundRobin
    from benchmarks.simulator.run import simulate, summary
    from deployments.admission import cost_model_for, routing_settings
    from deployments.config import AppConfig
    from deployments.runtime import resolve_source
    from disagg.cli import default_cache_dir

    args = _policy_parser("simulate").parse_args(argv)
    app_args = yaml.safe_load(args.yaml.read_text())["applications"][0]["args"]
    items, workload = _trace_of(args, app_args)
    config = AppConfig.model_validate(app_args)
    config = config.model_copy(update={"cache_dir": config.cache_dir or default_cache_dir()})
    model_config = resolve_source(config).model_config()
    cost = cost_model_for(config, model_config)
    settings = routing_settings(config, model_config)
    cal = Calibration(cost, Overhead(0.0, 0.0), settings.kv_bytes_per_token, 0.0,
                      (cost.source,))
    if args.calibration is not None:  # engine costs timed on this machine, one thread
        from benchmarks.simulator.costs import from_calibration

        measured = from_calibration(args.calibration, [(0, 0.0), (1, 0.0)])
        cost = replace(cost, prefill=measured.cost.prefill, decode=measured.cost.decode,
                       source=measured.cost.source)
        cal = replace(cal, cost=cost, sources=(cost.source,))
    spec = ClusterSpec((PoolSpec("default", 1, config.prefill.num_replicas),),
                       num_decode=config.decode.num_replicas, link=settings.kv_backend,
                       decode_kv_tokens=int(config.decode.kv_cache_gib * (1 << 30))
                       // settings.kv_bytes_per_token,
                       max_num_seqs=config.decode.max_num_seqs)
    threshold = int(args.long.split(":")[1])
    rows = []
    for policy in (LengthAware(settings), RoundRobin(ROUND_ROBIN_THRESHOLD, args.seed),
                   AlwaysRemote(args.seed)):
        reqs = simulate(spec, cal, policy, items)
        s, short = summary(reqs), summary([r for r in reqs if r.prompt_tokens < threshold])
        long_ = summary([r for r in reqs if r.prompt_tokens >= threshold])
        rows.append({"policy": policy.name, "workload": workload, "source": "simulator",
                     "cluster": f"CPU app: {config.prefill.num_replicas} prefill + "
                                f"{config.decode.num_replicas} decode replicas, 1 thread each",
                     "requests": s["num_requests"], "completed": s["completed"],
                     "rejected": s["rejected"], "ttft_p50_s": s["ttft_p50_s"],
                     "ttft_p99_s": s["ttft_p99_s"], "throughput_rps": s["throughput_rps"],
                     "ttft_short_p99_s": short["ttft_p99_s"],
                     "ttft_long_p99_s": long_["ttft_p99_s"],
                     "local_fraction": s["local_fraction"], "cost_model": cost.source})
        print({k: rows[-1][k] for k in ("policy", "ttft_p50_s", "ttft_p99_s", "throughput_rps",
                                        "ttft_short_p99_s", "ttft_long_p99_s",
                                        "local_fraction")})
    path = args.out or RESULTS_DIR / "routing.json"
    payload = json.loads(path.read_text()) if path.exists() else {"benchmark": "routing",
                                                                   "rows": []}
    payload["rows"] = [r for r in payload["rows"]
                       if not (r.get("workload") == workload and r.get("source") == "simulator")]
    payload["rows"] += rows
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def main_policies(argv: list[str]) -> int:
    import os

    from benchmarks.loadgen.client import RequestSpec
    from benchmarks.loadgen.prompts import TokenIdPrompts
    from benchmarks.loadgen.runner import RunConfig, run

    args = _policy_parser("policies").parse_args(argv)

    import ray
    from ray import serve

    app_args = yaml.safe_load(args.yaml.read_text())["applications"][0]["args"]
    model = app_args["model"]
    items, workload = _trace_of(args, app_args)
    threshold = int(args.long.split(":")[1])  # short / long split for the per-class columns
    prompts = TokenIdPrompts(512, seed=args.seed)
    out = args.out or RESULTS_DIR / "routing_cpu_policies.json"
    extra = {"config": str(args.yaml.resolve().relative_to(YAML.parents[1])), "cpus": 2,
             "model": model, "threads": 1, "workload": workload, "seed": args.seed,
             "round_robin_threshold": ROUND_ROBIN_THRESHOLD}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    set_process_env()  # what `make serve` gives Serve (deployments/serve_env.py)
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False)
    rows = []
    if args.append and out.exists():
        rows = [r for r in json.loads(out.read_text())["rows"] if r["workload"] == workload]
    first = 1 + max((r["round"] for r in rows), default=-1)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for round_ in range(first, first + args.rounds):
            order = args.policies if round_ % 2 == 0 else args.policies[::-1]
            for policy in order:
                name = f"routing-{policy}-{round_}"
                with serve_default_prefill(policy != "length_aware"):
                    _deploy(policy_args(app_args, policy), name)
                asyncio.run(_warm(url, model))
                load_before = os.getloadavg()

                def make_spec(w):
                    return RequestSpec(url=f"{url}/v1/completions", chat=False, model=model,
                                       prompt=prompts.build(w.index, w.prompt_tokens),
                                       max_tokens=w.output_tokens, ignore_eos=True,
                                       token_chunks="any")

                results = asyncio.run(run(items, make_spec, RunConfig(timeout_s=900,
                                                                      progress=False)))
                row = _policy_row(policy, round_, results, items, workload, threshold)
                row["loadavg_before"], row["loadavg_after"] = load_before, os.getloadavg()
                rows.append(row)
                serve.delete(name)
                print({k: row[k] for k in ("policy", "round", "completed", "failed",
                                           "errors_by_status", "ttft_p50_s", "ttft_p99_s",
                                           "ttft_short_p99_s", "ttft_long_p99_s",
                                           "throughput_rps", "paths", "loadavg_after")},
                      flush=True)
                write_results("routing_cpu_policies", rows, commit=args.commit,
                              dirty=args.dirty, out=out,
                              extra={**extra, "summary": _aggregate(rows, workload)})
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out is None:
        merge_routing_json(_aggregate(rows, workload), workload, RESULTS_DIR / "routing.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
