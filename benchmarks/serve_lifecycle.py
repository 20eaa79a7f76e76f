"""Start and stop of the Serve app: seconds to the first served request, and what a signal
does to a stream in flight.

For each command (``python -m deployments.launch``, which ``make serve`` runs, and ``serve
run``), on the same config and a warm model cache: start it, poll ``/v1/models``, send one chat
completion (and the same again, for contrast), then start a streamed completion on the
disaggregated path and send the signal after a few tokens. Records the times, how many of the
tokens reached the client, whether the stream ended with ``[DONE]``, and the exit time.

    python -m benchmarks.serve_lifecycle [--config deployments/prefill_decode.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import add_provenance_args, print_table, write_results

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "launch": [sys.executable, "-m", "deployments.launch"],
    "serve-run": [str(Path(sys.executable).parent / "serve"), "run"],
}
STREAM_TOKENS = 48
SIGNAL_AFTER = 5  # tokens


def _wait_ready(url: str, proc: subprocess.Popen, t0: float, timeout_s: float) -> float:
    while True:
        if time.perf_counter() - t0 > timeout_s or proc.poll() is not None:
            raise SystemExit("the app did not come up")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.5)


def _stream_through_signal(url: str, proc: subprocess.Popen, sig: int) -> dict:
    """Stream a long-prompt completion; signal the command's process group mid-stream."""
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": STREAM_TOKENS,
            "temperature": 0, "prompt": "The quick brown fox jumps over the lazy dog. " * 40}
    tokens, done, sent, path = 0, False, None, None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            path = r.headers.get("x-disagg-path")
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data: ") and json.loads(line[6:])["choices"]:
                    tokens += 1
                    if tokens == SIGNAL_AFTER:
                        sent = time.perf_counter()
                        os.killpg(proc.pid, sig)
    except httpx.HTTPError:
        pass  # the stream was cut
    stream_end_s = time.perf_counter() - sent
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"path": path, "tokens_received": tokens, "tokens_asked": STREAM_TOKENS,
            "done_line": done, "stream_end_after_signal_s": stream_end_s,
            "exit_after_signal_s": time.perf_counter() - sent, "exit_code": proc.returncode}


def measure(name: str, config: str, url: str, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*COMMANDS[name], config], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready_s = _wait_ready(url, proc, t0, timeout_s)
        body = {"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}]}
        httpx.post(f"{url}/v1/chat/completions", timeout=120, json=body).raise_for_status()
        first_s = time.perf_counter() - t0
        t1 = time.perf_counter()  # the same request again: what a warm service takes
        httpx.post(f"{url}/v1/chat/completions", timeout=120, json=body).raise_for_status()
        second_s = time.perf_counter() - t1
        stop = _stream_through_signal(url, proc, signal.SIGINT)  # Ctrl-C in a terminal
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"command": name, "config": config, "ready_s": ready_s, "first_request_s": first_s,
            "second_request_alone_s": second_s, **stop, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deployments/prefill_decode.yaml")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    add_provenance_args(parser)
    args = parser.parse_args()
    rows = [measure(name, args.config, args.url, args.timeout_s) for name in args.commands]
    write_results("serve_lifecycle", rows, commit=args.commit, dirty=args.dirty, out=args.out)
    print_table(rows, ["command", "ready_s", "first_request_s", "tokens_received", "done_line",
                       "stream_end_after_signal_s", "exit_after_signal_s", "exit_code"])


if __name__ == "__main__":
    main()
