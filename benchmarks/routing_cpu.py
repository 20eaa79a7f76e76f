"""Routing and admission on the CPU app (SmolLM2-135M, ``deployments/prefill_decode.yaml``).

    python -m benchmarks.routing_cpu            # -> benchmarks/results/routing_cpu.json

1. ``path_ttft`` rows: the same token-id prompts served with ``routing.mode`` forced to
   ``local`` and then to ``remote`` (otherwise the YAML's args): client TTFT per path and
   length, and the disaggregated path's exposed KV transfer (the server's ``disagg_timing``).
   ``benchmarks/fit_cost_model.py`` fits the CPU hop and object-store transfer from them.
2. ``burst`` rows: the YAML app as it ships (``routing: auto``) gets ``--burst`` long prompts
   at once while short prompts keep arriving: how many were admitted, refused with 429 (and
   how fast, with which Retry-After), and how the short ones fared. Every request is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.common import add_provenance_args, write_results

YAML = Path(__file__).resolve().parents[1] / "deployments" / "prefill_decode.yaml"


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


if __name__ == "__main__":
    raise SystemExit(main())
