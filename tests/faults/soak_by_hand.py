"""The by-hand soak (issue 17; not a test, not in CI): the real app on the embedded SmolLM2
(``make model`` prepared it), N requests at concurrency C through faultlib.soak -- short
prompts prefilled by decode and long ones disaggregated, streamed and whole, every 10th
cancelled by its client mid-way. Reports unexpected errors, the KV blocks / leases / fences
read back from the replicas, and each replica's RSS before, during and after (memory flat).

    .venv/bin/python tests/faults/soak_by_hand.py --requests 2000 \
        --out benchmarks/results/soak_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]

import psutil
from faultlib import soak, stats, wait_baseline
from helpers import embedded_model_dir, own_serve_app

APP = "soak"


def replica_rss_mib() -> dict[str, float]:
    """RSS of this app's Serve replicas and the lease keeper, by process title."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or ())
        for role in ("OpenAIIngress", "DecodeServer", "PrefillServer"):
            if title.startswith(f"ray::ServeReplica:{APP}:{role}"):
                out[role] = round(proc.info["memory_info"].rss / 2**20, 1)
        if title.startswith("ray::LeaseKeeper"):
            out["LeaseKeeper"] = round(proc.info["memory_info"].rss / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=120, help="the long prompts")
    parser.add_argument("--local-max", type=int, default=40,
                        help="local_prefill_max_tokens: shorter prompts stay on decode")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from benchmarks.common import write_results
    from deployments.config import AppConfig, PrefillSettings
    from disagg.models.embedded import EMBEDDED_MODEL

    config = AppConfig(cache_dir=embedded_model_dir().parent,
                       local_prefill_max_tokens=args.local_max, health_check_period_s=1.0)
    with own_serve_app(config, APP) as url:
        wait_baseline(APP)
        samples = [(0, replica_rss_mib())]
        step = max(1, args.requests // 10)

        def on_done(n: int) -> None:
            if n % step == 0:
                samples.append((n, replica_rss_mib()))
                print(f"{n} done, rss {samples[-1][1]}", flush=True)

        t0 = time.monotonic()
        outcomes = asyncio.run(soak(url, args.requests, args.concurrency, 300.0,
                                    model=EMBEDDED_MODEL, prompt_tokens=args.prompt_tokens,
                                    max_tokens=args.max_tokens, on_done=on_done))
        seconds = time.monotonic() - t0
        baseline_s = wait_baseline(APP, deadline_s=PrefillSettings().lease_s / 2)
        decode, prefill = stats(APP)
        samples.append((len(outcomes), replica_rss_mib()))
    unexpected = [o for o in outcomes if o not in ("ok", "cancelled")]
    row = {"requests": args.requests, "concurrency": args.concurrency,
           "long_prompt_tokens": args.prompt_tokens, "short_prompt_tokens": 5,
           "max_tokens": args.max_tokens, "ok": outcomes.count("ok"),
           "cancelled": outcomes.count("cancelled"), "unexpected": len(unexpected),
           "unexpected_examples": unexpected[:5], "seconds": round(seconds, 1),
           "baseline_after_s": round(baseline_s, 2),
           "decode_free_blocks": [decode.num_free_blocks, decode.num_total_blocks],
           "fenced_blocks": decode.num_fenced_blocks, "leases": prefill.num_leases,
           "prefills_served": prefill.num_prefills,
           "rss_mib": [{"after_requests": n, **rss} for n, rss in samples]}
    print(row)
    if args.out:
        write_results("soak_smollm2_cpu", [row], out=args.out,
                      extra={"model": EMBEDDED_MODEL,
                             "note": "by hand: tests/faults/soak_by_hand.py"})
    sys.exit(1 if unexpected else 0)


if __name__ == "__main__":
    main()
