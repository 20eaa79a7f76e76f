"""Decode as a served user sees it: TPOT over HTTP against the engine's own ITL, and the first
long request after ready against the second.

One process, one GPU, ``deployments/prefill_decode_1gpu.yaml`` (random Llama-3.1-8B, bf16):
1. Engine alone, before Ray starts: the decode step at batch 1 and the TPOT context
   (``benchmarks.decode_itl.EngineBench``, CUDA graphs).
2. ``--starts`` times (default 3), the Serve app started afresh (new replica processes; Ray,
   the controller and the proxy stay; each start once the GPU's memory is free of the last
   app's replicas, ``wait_for_device_memory``): right after it is ready (and the client's
   connection opened on the proxy's ``/-/healthz``), prompts of about ``--long`` tokens one at
   a time (a token shorter each: as with users' prompts no length repeats, so none finds a
   cuDNN plan built for its length by the one before), each after the idle seconds
   ``--long-idle`` names for it (default 30,30,0: the first and the second after the same 30 s
   of idle, so the first is compared with a request that waited as long, then one back to
   back: a request after idle pays the served path's idle cost whether it is first or not;
   the bare host path pays none, ``benchmarks.host_idle``).
   TTFT and the server's breakdown of each, with token 0's hops from the breakdown's
   wall-clock marks and the client's own: the first must pay no compilation and no first use.
   Then one prompt of each ``--short`` length, one at a time (lengths no earlier prompt of
   that start had, short enough that decode prefills them itself: what a chat user sends),
   TTFT each. After the last start's, ``--requests`` streamed requests one at a time with
   ``--context`` prompt tokens and ``--max-tokens`` generated: TPOT = (last chunk - first
   chunk) / (tokens - 1), median.
   ``--module-loading`` (e.g. ``EAGER,LAZY,EAGER``) names ``CUDA_MODULE_LOADING`` for each
   start's GPU replicas in turn (``deployments/serve_env.gpu_env``; unset: the replicas'
   default), so the two are compared in one run; ``--cudnn-avoid-recompile`` (e.g. ``1,0,1,0``)
   names ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE`` for each start's GPU replicas in the same way
   (unset: the operator's, else torch's default); each start also reports its seconds to ready
   and the GPU memory in use once ready (every process on the device, this one included).
   ``--profile-prefills DIR``: every start's prefill replica profiles its first two prefills
   (the first two long prompts: decode prefills short ones itself;
   ``disagg/prefill/profiling.py``); the events the first spent most more time in
   are printed per replica and kept. The profiler slows what it watches: timings of such a run
   are not the served ones.

    python -m benchmarks.served_decode [--context 4096] [--max-tokens 64] [--requests 5]
        [--starts 3] [--long-idle 30,30,0] [--module-loading EAGER,LAZY,EAGER]
        [--cudnn-avoid-recompile 1,0,1,0] [--profile-prefills DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from itertools import pairwise
from pathlib import Path

import httpx
import torch

from benchmarks.common import add_provenance_args, print_table, write_results
from benchmarks.kv_handoff import app_args
from deployments.config import AppConfig
from deployments.serve_env import (
    CUDA_MODULE_LOADING_ENV,
    CUDNN_AVOID_RECOMPILE_ENV,
    set_process_env,
)
from disagg.prefill.profiling import PROFILE_PREFILLS_ENV, diff_lines, replica_diffs


def wait_for_device_memory(free_bytes: int, *, slack_bytes: int = 2 << 30,
                           timeout_s: float = 120.0, mem_get_info=None,
                           sleep=time.sleep) -> float:
    """Wait until the GPU has ``free_bytes - slack_bytes`` free again: a deleted app's replica
    processes still hold their memory for a while, and a replica started meanwhile fails its
    start with CUDA out of memory (Serve restarts it: seconds added to ready). The seconds
    waited; past ``timeout_s`` it returns anyway."""
    mem_get_info = mem_get_info or torch.cuda.mem_get_info
    t0 = time.perf_counter()
    while mem_get_info()[0] < free_bytes - slack_bytes and time.perf_counter() - t0 < timeout_s:
        sleep(0.25)
    return time.perf_counter() - t0


def stream(client: httpx.Client, url: str, model: str, ids: list[int], max_tokens: int,
           timing: list | None = None) -> tuple[float, list[float]]:
    """(seconds to the first token chunk, arrival times of every token chunk); the usage's
    ``disagg_timing`` (the server's TTFT breakdown) is appended to ``timing`` when given."""
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    times = []
    t0, t0_wall, t_token0_wall = time.perf_counter(), time.time(), None
    with client.stream("POST", f"{url}/v1/completions", content=body, timeout=600,
                       headers={"content-type": "application/json"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                times.append(time.perf_counter())
                t_token0_wall = t_token0_wall or time.time()
            elif timing is not None and chunk.get("usage"):
                server = chunk["usage"].get("disagg_timing") or {}
                server.setdefault("marks", {}).update(client_sent=t0_wall,
                                                      client_token0=t_token0_wall)
                timing.append(server)
    return times[0] - t0, times


# The path of token 0, in order: each hop's ms is the next mark minus this one.
HOPS = ("client_sent", "ingress_received", "ingress_parsed", "ingress_sent", "decode_received",
        "decode_reserved", "prefill_received", "prefill_started", "prefill_token0", "decode_token0",
        "ingress_token0", "client_token0")


def hops_ms(marks: dict) -> dict[str, float]:
    """Milliseconds from each mark of ``HOPS`` to the next one present."""
    present = [h for h in HOPS if marks.get(h) is not None]
    return {f"{a}->{b}": (marks[b] - marks[a]) * 1e3 for a, b in pairwise(present)}


def measure_start(client: httpx.Client, url: str, model: str, vocab: int,
                  g: torch.Generator, long: int, long_idle: list[float],
                  short: list[int]) -> dict:
    """One app start's requests, right after it is ready: the long prompts (a token shorter
    each, every length new) after their idle seconds, then the short ones; TTFT, the server's
    breakdown and token 0's hops of each."""
    long_timing: list = []
    long_ttft = []
    for i, idle in enumerate(long_idle):
        ids = torch.randint(0, vocab, (long - i,), generator=g).tolist()
        time.sleep(idle)
        long_ttft.append(stream(client, url, model, ids, 2, long_timing)[0])
    short_timing: list = []
    short_ttft = [stream(client, url, model, torch.randint(0, vocab, (n,), generator=g).tolist(),
                         2, short_timing)[0] for n in short]
    return {"long_ttft_s": long_ttft, "long_disagg_timing": long_timing,
            "long_hops_ms": [hops_ms(t.get("marks", {})) for t in long_timing],
            "short_ttft_s": short_ttft,
            "short_prefill_s": [t.get("prefill_s") for t in short_timing]}  # None: local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("deployments/prefill_decode_1gpu.yaml"))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--long", type=int, default=32768)
    parser.add_argument("--long-idle", default="30,30,0",
                        help="idle seconds before each --long request, comma-separated")
    parser.add_argument("--short", default="301,777,1501,2222,2999",
                        help="prompt lengths of the short requests, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3,
                        help="app starts, each measured right after it is ready")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--module-loading", default="",
                        help="CUDA_MODULE_LOADING of each start's GPU replicas, comma-separated, "
                             "in turn (unset: the replicas' default)")
    parser.add_argument("--cudnn-avoid-recompile", default="",
                        help="TORCH_CUDNN_SDPA_AVOID_RECOMPILE of each start's GPU replicas, "
                             "comma-separated, in turn (unset: the operator's, else torch's)")
    parser.add_argument("--profile-prefills", type=Path,
                        help="directory: the prefill replicas profile their first two "
                             "prefills there (timings of such a run are perturbed)")
    add_provenance_args(parser)
    args = parser.parse_args()
    loadings = [x for x in args.module_loading.split(",") if x]
    avoids = [x for x in args.cudnn_avoid_recompile.split(",") if x]
    long_idle = [float(x) for x in args.long_idle.split(",")]
    short = [int(x) for x in args.short.split(",") if x]
    if len(long_idle) < 2:
        parser.error("--long-idle needs at least two requests (the first and the second)")
    import ray
    from ray import serve

    from benchmarks.decode_itl import EngineBench
    from deployments.app import build_app
    from deployments.runtime import resolve_source
    from disagg.models.loader import load_model

    config = AppConfig.model_validate(app_args(args.config))
    source = resolve_source(config)
    model = load_model(source, device=torch.device("cuda"), dtype=torch.bfloat16)
    bench = EngineBench(model, [(1, args.context)], steps=args.max_tokens + 10)
    engine_itl_ms = bench.run_engine(1, args.context, steps=args.max_tokens, warmup=5)["itl_ms"]
    del bench, model
    gc.collect()
    torch.cuda.empty_cache()

    set_process_env()  # what `make serve` gives Serve's proxy (deployments/serve_env.py)
    if args.profile_prefills:  # read by gpu_env() as build_app sets the replicas' options
        os.environ[PROFILE_PREFILLS_ENV] = str(args.profile_prefills.resolve())
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url, vocab = f"http://127.0.0.1:{args.port}", source.model_config().vocab_size
    g = torch.Generator().manual_seed(2)
    starts, tpot = [], []
    idle_free, _ = torch.cuda.mem_get_info()  # before any app: what each start waits back for
    waited_s = 0.0
    with httpx.Client() as client:
        for start in range(args.starts):
            loading = loadings[start % len(loadings)] if loadings else None
            if loading:  # read by gpu_env() as build_app sets the replicas' options
                os.environ[CUDA_MODULE_LOADING_ENV] = loading
            avoid = avoids[start % len(avoids)] if avoids else None
            if avoid:
                os.environ[CUDNN_AVOID_RECOMPILE_ENV] = avoid
            t_start = time.perf_counter()
            serve.run(build_app(config), name="disagg", route_prefix="/")  # fresh replicas
            ready_s = time.perf_counter() - t_start
            free, total = torch.cuda.mem_get_info()
            # The client's connection is opened (or kept alive) on the proxy's health route
            # (answered by the proxy, never by the app): the first timed request then compares
            # the server's first request with its second, not a TCP connect with a kept-alive
            # connection.
            client.get(f"{url}/-/healthz", timeout=30).raise_for_status()
            starts.append(measure_start(client, url, config.model_name, vocab, g, args.long,
                                        long_idle, short))
            starts[-1].update(module_loading=loading, cudnn_avoid_recompile=avoid,
                              ready_s=ready_s, waited_for_device_s=waited_s,
                              device_used_gib=(total - free) / 2**30)
            print(f"start {start + 1} ({loading or 'default'} loading, avoid_recompile "
                  f"{avoid or 'default'}, ready {ready_s:.1f} s, "
                  f"{(total - free) / 2**30:.2f} GiB): long TTFT ms "
                  + " / ".join(f"{t * 1e3:.1f}" for t in starts[-1]["long_ttft_s"])
                  + "; prefill ms " + " / ".join(f"{t.get('prefill_s', float('nan')) * 1e3:.1f}"
                                                 for t in starts[-1]["long_disagg_timing"]),
                  flush=True)  # as it comes: a run cut short still shows its starts
            if start == args.starts - 1:
                for _ in range(args.requests):
                    ids = torch.randint(0, vocab, (args.context,), generator=g).tolist()
                    _, times = stream(client, url, config.model_name, ids, args.max_tokens)
                    tpot.append((times[-1] - times[0]) / (len(times) - 1))
            serve.delete("disagg")
            waited_s = wait_for_device_memory(idle_free)  # the next start finds the GPU free
    serve.shutdown()
    ray.shutdown()
    first = [s["long_ttft_s"][0] for s in starts]
    second = [s["long_ttft_s"][1] for s in starts]
    row = {"context_tokens": args.context, "max_tokens": args.max_tokens,
           "engine_itl_ms": engine_itl_ms, "http_tpot_ms": statistics.median(tpot) * 1e3,
           "first_long_ttft_s": statistics.median(first),
           "second_long_ttft_s": statistics.median(second),
           "first_minus_second_ms": [(a - b) * 1e3 for a, b in zip(first, second, strict=True)],
           "long_idle_s": long_idle, "long_tokens": args.long, "short_tokens": short,
           "app_starts": args.starts, "starts": starts, "requests": args.requests,
           "module_loading": [s["module_loading"] for s in starts],
           "cudnn_avoid_recompile": [s["cudnn_avoid_recompile"] for s in starts]}
    row["tpot_over_itl_ms"] = row["http_tpot_ms"] - row["engine_itl_ms"]
    if args.profile_prefills:
        row["prefill_profiles"] = replica_diffs(args.profile_prefills)
    write_results("served_decode", [row], commit=args.commit, dirty=args.dirty, out=args.out)
    print_table([row], ["engine_itl_ms", "http_tpot_ms", "tpot_over_itl_ms", "first_long_ttft_s",
                        "second_long_ttft_s"])
    print(f"{'idle before (s)':36s}" + "".join(f"{i:10.1f}" for i in long_idle))
    for n, st in enumerate(starts):  # each app start: where its long requests' time went
        print(f"--- app start {n + 1}: {st['module_loading'] or 'default'} module loading, "
              f"avoid_recompile {st['cudnn_avoid_recompile'] or 'default'}, "
              f"ready in {st['ready_s']:.1f} s, {st['device_used_gib']:.2f} GiB in use")
        print(f"{'TTFT (ms)':36s}" + "".join(f"{t * 1e3:10.2f}" for t in st["long_ttft_s"]))
        print(f"{'prefill (ms)':36s}" + "".join(
            f"{s.get('prefill_s', float('nan')) * 1e3:10.2f}" for s in st["long_disagg_timing"]))
        print(f"{'outside the prefill (ms)':36s}" + "".join(
            f"{(t - s.get('prefill_s', float('nan'))) * 1e3:10.2f}"
            for t, s in zip(st["long_ttft_s"], st["long_disagg_timing"], strict=True)))
        for hop in st["long_hops_ms"][0]:
            print(f"{hop:36s}" + "".join(f"{h.get(hop, float('nan')):10.2f}"
                                         for h in st["long_hops_ms"]))
        print(f"{'short prompt (tokens)':36s}" + "".join(f"{n:10d}" for n in short))
        print(f"{'short TTFT (ms)':36s}" + "".join(f"{t * 1e3:10.2f}"
                                                  for t in st["short_ttft_s"]))
    for profile in row.get("prefill_profiles", []):  # first minus second, per replica
        print(f"--- prefill replica {profile['pid']}: prompts {profile['prompt_tokens']}, "
              f"profiled ms " + " / ".join(f"{t:.1f}" for t in profile["profiled_ms"])
              + "; garbage collections [generation, ms] " + " / ".join(
                  str([[g, round(ms, 1)] for g, ms in p]) for p in profile["gc_pauses"]))
        print("\n".join(diff_lines(profile["diff"])))

if __name__ == "__main__":
    main()
