"""``python -m benchmarks.serve``: an asyncio HTTP load generator for any OpenAI-compatible
streaming server (ours, vLLM, SGLang...), reporting TTFT, TPOT, ITL, end-to-end latency,
throughput and goodput with vLLM's definitions (``benchmarks/loadgen/client.py`` says where
they differ), plus our server's per-request TTFT breakdown when it sends one.

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --setup cpu \\
        --prompt-len uniform:300:600 --output-len fixed:16 --num-requests 40 \\
        --request-rate 0.2 0.4 --goodput ttft:3000 tpot:500 --plot-dir benchmarks/results

Each rate (or ``--max-concurrency`` with rate ``inf``) is one run and one row of
``benchmarks/results/serve_<setup>.json``; rows keep their per-request records.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.loadgen.client import RequestSpec
from benchmarks.loadgen.prompts import TextPrompts, TokenIdPrompts
from benchmarks.loadgen.report import parse_slos, print_summary, summarize
from benchmarks.loadgen.runner import RunConfig, first_model, run
from benchmarks.loadgen.workload import WorkItem, load_trace, parse_lengths, synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--setup", default="custom", help="names the results file serve_<setup>.json")
    p.add_argument("--device", default=None, help="the server's device, for the results file "
                                                 "(default: this machine's)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--duration-s", type=float, default=None,
                   help="with a finite rate: send rate x duration requests (overrides "
                        "--num-requests)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="req/s, one run per value (inf = all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps (1 = Poisson, <1 burstier)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (closed loop with rate inf)")
    p.add_argument("--prompt-len", default="fixed:512", help="length spec (workload.py)")
    p.add_argument("--output-len", default="fixed:64", help="length spec (workload.py)")
    p.add_argument("--trace", type=Path, default=None,
                   help="JSONL of arrival_s / prompt_tokens / output_tokens (replaces the rate "
                        "and length options)")
    p.add_argument("--prompt-kind", choices=("token_ids", "text"), default="token_ids")
    p.add_argument("--tokenizer", default=None, help="local tokenizer dir for text prompts")
    p.add_argument("--vocab-size", type=int, default=512,
                   help="token-id prompts draw ids below this (512 suits every random config)")
    p.add_argument("--token-chunks", choices=("auto", "text", "any"), default="auto",
                   help="which chunks count as tokens (auto: any for token ids, text for text)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for exactly max_tokens (vLLM's ignore_eos extension)")
    p.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS",
                   help="SLOs in ms: ttft:2000 tpot:100 e2el:30000")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-requests", action="store_true", help="leave per-request records out")
    add_provenance_args(p)
    return p.parse_args(argv)


def _workloads(args) -> list[tuple[float | None, list[WorkItem]]]:
    if args.trace is not None:
        return [(None, load_trace(args.trace))]
    prompt, output = parse_lengths(args.prompt_len), parse_lengths(args.output_len)
    runs = []
    for rate in args.request_rate:
        closed = math.isinf(rate) and args.max_concurrency is not None
        n = args.num_requests
        if args.duration_s is not None and not math.isinf(rate):
            n = max(1, math.ceil(rate * args.duration_s))
        runs.append((rate, synthetic(n, prompt, output,
                                     rate=None if closed else rate,
                                     burstiness=args.burstiness, seed=args.seed)))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.base_url.rstrip("/")
    if args.prompt_kind == "text":
        if args.tokenizer is None:
            sys.exit("--prompt-kind text needs --tokenizer")
        prompts = TextPrompts(args.tokenizer, seed=args.seed)
    else:
        if args.endpoint == "chat":
            sys.exit("chat prompts are text: use --prompt-kind text")
        prompts = TokenIdPrompts(args.vocab_size, seed=args.seed)
    token_chunks = args.token_chunks
    if token_chunks == "auto":
        token_chunks = "any" if prompts.kind == "token_ids" else "text"
    model = args.model or asyncio.run(first_model(base, args.api_key))
    url = f"{base}/v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"
    slos = parse_slos(args.goodput)

    def make_spec(w: WorkItem) -> RequestSpec:
        return RequestSpec(url=url, chat=args.endpoint == "chat", model=model,
                           prompt=prompts.build(w.index, w.prompt_tokens),
                           max_tokens=w.output_tokens, ignore_eos=args.ignore_eos,
                           token_chunks=token_chunks, api_key=args.api_key)

    rows = []
    for rate, items in _workloads(args):
        results = asyncio.run(run(items, make_spec, RunConfig(
            max_concurrency=args.max_concurrency, timeout_s=args.timeout_s,
            progress=not args.no_progress)))
        row = {"setup": args.setup, "endpoint": args.endpoint, "model": model,
               "request_rate": None if rate is None or math.isinf(rate) else rate,
               "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
               "prompt_len": str(args.trace) if args.trace else args.prompt_len,
               "output_len": None if args.trace else args.output_len,
               "prompt_kind": prompts.kind, "token_chunks": token_chunks,
               **summarize(results, slos)}
        if not args.no_requests:
            row["requests"] = [r.to_dict() for r in results]
        print_summary(row)
        rows.append(row)
    out = args.out or RESULTS_DIR / f"serve_{args.setup}.json"
    extra = {"setup": args.setup, "base_url": base, "argv": sys.argv[1:] if argv is None else argv}
    if args.device:
        extra["device"] = args.device
    path = write_results("serve", rows, commit=args.commit, dirty=args.dirty, out=out,
                         extra=extra)
    if args.plot_dir is not None and any("requests" in r for r in rows):
        from benchmarks.loadgen.plots import plot_runs

        for plot in plot_runs(rows, args.plot_dir, f"serve_{args.setup}"):
            print(f"plot: {plot}")
    print_table(rows, ["request_rate", "completed", "failed", "ttft_mean_s", "ttft_p90_s",
                       "tpot_mean_s", "request_throughput_rps"])
    print(f"wrote {path}")
    return 0 if all(r["completed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
