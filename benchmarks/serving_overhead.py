"""Per-request overhead of the serving layer: TTFT and TPOT through HTTP vs the engine alone.

Same process, same GPU, same model (random weights of a named architecture, token-id
prompts), short prompts on the local path: the decode engine driven directly, then the whole
Serve app (ingress -> decode replica) over HTTP with streaming. The difference of medians is
what the serving layer adds per request.

    python -m benchmarks.serving_overhead [--model random:llama-3.1-8b] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import requests
import torch

from benchmarks.common import add_provenance_args, print_table, write_results
from deployments.config import AppConfig
from deployments.serve_env import set_process_env
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.models.loader import load_model, resolve_model
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams


def engine_alone(model_name: str, prompts: list[list[int]], max_tokens: int, device: str):
    model = load_model(resolve_model(model_name, cache_dir=None),
                       device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    engine = DecodeEngine(model, DecodeConfig(kv_cache_bytes=4 << 30), model_name=model_name)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    samples = []
    for i, ids in enumerate([prompts[0]] + prompts):  # the first one warms up
        engine.add_request(EngineRequest(f"r{i}", tuple(ids), params, max_tokens, 0))
        t0, times = time.perf_counter(), []
        while engine.has_unfinished():
            for out in engine.step():
                if out.token is not None:
                    times.append(time.perf_counter())
        if i:
            samples.append((times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)))
    del engine, model
    torch.cuda.empty_cache() if device == "cuda" else None
    return samples


def through_http(url: str, model_name: str, prompts: list[list[int]], max_tokens: int):
    samples = []
    for i, ids in enumerate([prompts[0]] + prompts):
        body = {"model": model_name, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        t0, times = time.perf_counter(), []
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=300) as r:
            r.raise_for_status()
            assert r.headers["x-disagg-path"] == "local"
            for line in r.iter_lines():
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())  # one chunk per generated token
        if i:
            samples.append((times[0] - t0, (times[-1] - times[0]) / max(1, len(times) - 1)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus per replica")
    add_provenance_args(parser)
    args = parser.parse_args()
    import ray
    from ray import serve

    from deployments.app import build_app

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    vocab = resolve_model(args.model, cache_dir=None).model_config().vocab_size
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.requests)]
    engine = engine_alone(args.model, prompts, args.max_tokens, device)

    # Replicas must import this checkout and any carried packages, as this process does.
    set_process_env()  # what `make serve` gives Serve (deployments/serve_env.py)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    gpus = 0.4 if device == "cuda" else 0
    config = AppConfig.model_validate({
        "model": args.model, "local_prefill_max_tokens": 4096,
        "prefill": {"num_cpus": args.replica_cpus, "num_gpus": gpus},
        "decode": {"num_cpus": args.replica_cpus, "num_gpus": gpus, "kv_cache_gib": 4},
        "ingress": {"num_cpus": args.replica_cpus}})
    serve.run(build_app(config), name="disagg", route_prefix="/")
    http = through_http(f"http://127.0.0.1:{args.port}", config.model_name, prompts,
                        args.max_tokens)
    serve.shutdown()
    ray.shutdown()

    def med(samples, k):
        return statistics.median(s[k] for s in samples) * 1e3

    row = {"model": args.model, "prompt_tokens": args.prompt_tokens,
           "max_tokens": args.max_tokens, "requests": args.requests,
           "engine_ttft_ms": med(engine, 0), "http_ttft_ms": med(http, 0),
           "engine_tpot_ms": med(engine, 1), "http_tpot_ms": med(http, 1)}
    row["ttft_overhead_ms"] = row["http_ttft_ms"] - row["engine_ttft_ms"]
    row["tpot_overhead_ms"] = row["http_tpot_ms"] - row["engine_tpot_ms"]
    write_results("serving_overhead", [row], commit=args.commit, dirty=args.dirty, out=args.out)
    print_table([row], ["engine_ttft_ms", "http_ttft_ms", "ttft_overhead_ms",
                        "engine_tpot_ms", "http_tpot_ms", "tpot_overhead_ms"])


if __name__ == "__main__":
    main()
