"""Seconds from ``serve run deployments/prefill_decode.yaml`` to the first served request.

Measured on a warm model cache (the embedded model already converted): starts the command,
polls ``/v1/models``, then sends one chat completion (and the same one again, for contrast);
records the times and stops the app.

    python -m benchmarks.serve_startup [--config deployments/prefill_decode.yaml]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import add_provenance_args, print_table, write_results

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deployments/prefill_decode.yaml")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout-s", type=float, default=600)
    add_provenance_args(parser)
    args = parser.parse_args()
    serve_bin = Path(sys.executable).parent / "serve"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(serve_bin), "run", args.config], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        ready_s = None
        while ready_s is None:
            if time.perf_counter() - t0 > args.timeout_s or proc.poll() is not None:
                raise SystemExit("the app did not come up")
            try:
                if httpx.get(f"{args.url}/v1/models", timeout=5).status_code == 200:
                    ready_s = time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}]}
        httpx.post(f"{args.url}/v1/chat/completions", timeout=120, json=body).raise_for_status()
        first_s = time.perf_counter() - t0
        t1 = time.perf_counter()  # the same request again: what a warm service takes
        httpx.post(f"{args.url}/v1/chat/completions", timeout=120, json=body).raise_for_status()
        second_request_s = time.perf_counter() - t1
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = [{"config": args.config, "ready_s": ready_s, "first_request_s": first_s,
             "second_request_alone_s": second_request_s, "cpus": os.cpu_count()}]
    write_results("serve_startup", rows, commit=args.commit, dirty=args.dirty, out=args.out)
    print_table(rows, ["config", "ready_s", "first_request_s", "second_request_alone_s"])


if __name__ == "__main__":
    main()
