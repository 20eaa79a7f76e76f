"""KV hand-off cost as a user sees it: served TTFT and token 0 -> token 1 over HTTP, per backend.

One process, one GPU (``deployments/prefill_decode_1gpu.yaml``: random Llama-3.1-8B, bf16,
TriangleMix prefill, prefill and decode replicas sharing the GPU), token-id prompts:
1. Engine alone, before Ray starts: the prefill engine's TTFT at each length, and one decode
   step at that context (``benchmarks.decode_itl.EngineBench``).
2. For each backend (``kv_transports: [backend]``): the Serve app; one warm-up request per
   length; then ``--runs`` rounds, each sending every length once (interleaved), streamed.
Per request: served TTFT (POST -> first token chunk), token 0 -> token 1 (first -> second
chunk), and the server's breakdown from the final usage chunk (``disagg_timing``). The exposed
hand-off cost is served TTFT minus the prefill compute time the server reports; its GB/s is
KV bytes over the decode-side transfer time. Medians per (backend, length).

    python -m benchmarks.kv_handoff [--config deployments/prefill_decode_1gpu.yaml]
        [--backends cuda_ipc,object_store] [--lengths 8192,32768,131000] [--runs 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import torch
import yaml

from benchmarks.common import add_provenance_args, print_table, write_results
from deployments.config import AppConfig
from deployments.serve_env import set_process_env

COLUMNS = ["context_tokens", "backend", "engine_ttft_s", "served_ttft_s", "server_prefill_s",
           "exposed_ms", "token0_to_token1_s", "engine_decode_step_ms", "gbps"]


def app_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]["args"]


def engine_alone(config: AppConfig, lengths: list[int], repeats: int) -> dict[int, dict]:
    """Prefill TTFT and one decode step at each length, on the engines without Serve."""
    from benchmarks.decode_itl import EngineBench
    from deployments.runtime import resolve_source, trianglemix_config
    from disagg.models.loader import load_model
    from disagg.prefill.engine import PrefillEngine
    from disagg.prefill.warmup import warm_up_prefill
    from disagg.request import EngineRequest
    from disagg.sampling import SamplingParams

    source = resolve_source(config)
    model = load_model(source, device=torch.device("cuda"), dtype=torch.bfloat16)
    prefill = PrefillEngine(model, model_name=config.model_name,
                            trianglemix=trianglemix_config(config, source.model_config()))
    warm_up_prefill(prefill)
    out = {}
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (n,)).tolist()
        request = EngineRequest(f"e{n}", tuple(ids), SamplingParams(temperature=0.0), 2, 0)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prefill.prefill(request)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[n] = {"engine_ttft_s": statistics.median(times)}
        gc.collect()
        torch.cuda.empty_cache()
    del prefill
    bench = EngineBench(model, [(1, n) for n in lengths], steps=25)  # steps + warm-up
    for n in lengths:
        out[n]["engine_decode_step_ms"] = bench.run(1, n, steps=20, warmup=5)["sync_step_ms"]
    del bench, model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def one_request(client: httpx.Client, url: str, model: str, ids: list[int]) -> dict:
    # The body is encoded before the clock starts, as a load generator sends prepared bytes.
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": 3, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    times, usage = [], None
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", content=body, timeout=600,
                       headers={"content-type": "application/json"}) as r:
        r.raise_for_status()
        assert r.headers["x-disagg-path"] == "disaggregated"
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                times.append(time.perf_counter())
            elif event.get("usage"):
                usage = event["usage"]
    timing = usage["disagg_timing"]
    return {"served_ttft_s": times[0] - t0, "token0_to_token1_s": times[1] - times[0],
            "server_prefill_s": timing["prefill_s"], "transfer_s": timing["transfer_s"],
            "kv_bytes": timing["kv_bytes"], "backend": timing["kv_backend"]}


def served(config: AppConfig, backend: str, lengths: list[int], runs: int, port: int
           ) -> dict[int, list[dict]]:
    from ray import serve

    from deployments.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_config = config.model_copy(update={"kv_transports": [backend]})
    t0 = time.perf_counter()
    serve.run(build_app(app_config), name="disagg", route_prefix="/")
    print(f"{backend}: app ready in {time.perf_counter() - t0:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}"
    from deployments.runtime import resolve_source

    vocab = resolve_source(config).model_config().vocab_size
    g = torch.Generator().manual_seed(1)
    samples: dict[int, list[dict]] = {n: [] for n in lengths}
    with httpx.Client() as client:
        for n in lengths:  # warm-up: first requests of a length pay one-off costs
            one_request(client, url, config.model_name,
                        torch.randint(0, vocab, (n,), generator=g).tolist())
        for r in range(runs):
            for n in lengths:
                s = one_request(client, url, config.model_name,
                                torch.randint(0, vocab, (n,), generator=g).tolist())
                assert s["backend"] == backend, s
                samples[n].append(s)
                print(f"{backend} run {r} {n}: ttft {s['served_ttft_s']:.3f} s, prefill "
                      f"{s['server_prefill_s']:.3f} s, t0->t1 {s['token0_to_token1_s']:.3f} s",
                      flush=True)
    serve.delete("disagg")
    serve.shutdown()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("deployments/prefill_decode_1gpu.yaml"))
    parser.add_argument("--backends", default="cuda_ipc,object_store")
    parser.add_argument("--lengths", default="8192,32768,131000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engine-repeats", type=int, default=3)
    parser.add_argument("--skip-engine", action="store_true",
                        help="leave engine_* columns empty (when another call measured them)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--setup", default="1gpu", help="the rows' setup name (1gpu, 2gpu)")
    add_provenance_args(parser)
    args = parser.parse_args()
    import ray

    lengths = [int(x) for x in args.lengths.split(",")]
    config = AppConfig.model_validate(app_args(args.config))
    engine = {} if args.skip_engine else engine_alone(config, lengths, args.engine_repeats)
    set_process_env()  # what `make serve` gives Serve (deployments/serve_env.py)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    rows = []
    for backend in args.backends.split(","):
        samples = served(config, backend, lengths, args.runs, args.port)
        for n in lengths:
            s = samples[n]

            def med(key, scale=1.0):
                return statistics.median(x[key] for x in s) * scale  # noqa: B023

            rows.append({
                "setup": args.setup, "context_tokens": n, "backend": backend,
                **engine.get(n, {}),
                "served_ttft_s": med("served_ttft_s"), "server_prefill_s": med("server_prefill_s"),
                "exposed_ms": statistics.median(
                    (x["served_ttft_s"] - x["server_prefill_s"]) * 1e3 for x in s),
                "token0_to_token1_s": med("token0_to_token1_s"),
                "transfer_ms": med("transfer_s", 1e3),
                "gbps": statistics.median(x["kv_bytes"] / x["transfer_s"] / 1e9 for x in s),
                "kv_bytes": s[0]["kv_bytes"], "runs": len(s)})
        write_results("kv_handoff", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                      extra={"config": str(args.config)})
    ray.shutdown()
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
