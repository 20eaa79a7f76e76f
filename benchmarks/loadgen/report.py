"""The summary of one run: counts, throughput, goodput, percentiles, errors by status, and
our per-request TTFT breakdown when the server sent it.

Same definitions as vLLM's ``calculate_metrics``: percentiles by linear interpolation
(``numpy.percentile``); TPOT over requests with more than one output token; ITL pooled over all
requests; throughput = completed requests (output tokens) / duration, where the duration runs
from the first send to the last response; goodput = requests meeting every SLO / duration, a
request with one output token counting TPOT as 0. SLOs are given in milliseconds
(``ttft:2000 tpot:100 e2el:30000``, vLLM's keys). Times here are in seconds (``_s``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from benchmarks.loadgen.client import RequestResult

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")
BREAKDOWN = ("queue_s", "prefill_s", "transfer_s", "first_decode_s")


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``["ttft:2000", "tpot:100"]`` (ms) -> ``{"ttft": 2.0, "tpot": 0.1}`` (s)."""
    slos = {}
    for item in items or ():
        key, _, value = item.partition(":")
        if key not in SLO_KEYS or not value:
            raise ValueError(f"bad SLO {item!r}: use KEY:MS with KEY in {SLO_KEYS}")
        slos[key] = float(value) / 1000.0
    return slos


def stats(values: list[float], name: str) -> dict[str, float | None]:
    """``<name>_mean_s``, ``_median_s``, ``_std_s`` and ``_p50/p90/p99_s`` (None if empty)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    keys = [f"{name}_mean_s", f"{name}_median_s", f"{name}_std_s",
            *(f"{name}_p{p}_s" for p in PERCENTILES)]
    if arr.size == 0:
        return dict.fromkeys(keys)
    vals = [arr.mean(), np.median(arr), arr.std(), *np.percentile(arr, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, vals)}


def is_good(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    measured = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.e2e_s}
    return all(measured[k] <= limit for k, limit in slos.items())


def error_key(r: RequestResult) -> str:
    if r.status == 0:
        return "connection"
    if r.status == 200:
        return "200_stream_error"
    return str(r.status)


def summarize(results: list[RequestResult], slos: dict[str, float] | None = None
              ) -> dict:
    """One row of the results JSON for one run."""
    slos = slos or {}
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    if results:
        t_start = min(r.start_s for r in results)
        t_end = max(r.start_s + (r.e2e_s or 0.0) for r in results)
        duration = max(t_end - t_start, 1e-9)
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.server_prompt_tokens or r.prompt_tokens for r in ok)
    row = {
        "num_requests": len(results), "completed": len(ok), "failed": len(failed),
        "errors_by_status": dict(sorted(Counter(error_key(r) for r in failed).items())),
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput_rps": len(ok) / duration if duration else 0.0,
        "output_throughput_tps": out_tokens / duration if duration else 0.0,
        "total_token_throughput_tps": (in_tokens + out_tokens) / duration if duration else 0.0,
        "slos_s": slos,
        "goodput_rps": (sum(is_good(r, slos) for r in results) / duration
                        if slos and duration else None),
        **stats([r.ttft_s for r in ok], "ttft"),
        **stats([r.tpot_s for r in ok], "tpot"),
        **stats([x for r in ok for x in r.itl_s], "itl"),
        **stats([r.e2e_s for r in ok], "e2el"),
        "paths": dict(Counter(r.path for r in ok if r.path is not None)),
    }
    timed = [r.timing for r in ok if r.timing]
    if timed:
        for key in BREAKDOWN:
            s = stats([t.get(key) for t in timed], "breakdown_" + key.removesuffix("_s"))
            row.update({k: s[k] for k in s if "_std_" not in k and "_median_" not in k})
    return row


def print_summary(row: dict) -> None:
    """vLLM-style text summary on stdout."""
    def ms(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v * 1000:.2f}"

    print(f"requests: {row['completed']}/{row['num_requests']} completed, "
          f"errors {row['errors_by_status'] or 'none'}; duration {row['duration_s']:.2f} s")
    print(f"throughput: {row['request_throughput_rps']:.3f} req/s, "
          f"{row['output_throughput_tps']:.1f} output tok/s, "
          f"{row['total_token_throughput_tps']:.1f} total tok/s"
          + (f"; goodput {row['goodput_rps']:.3f} req/s" if row["goodput_rps"] is not None
             else ""))
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(f"{name.upper():>5} ms: mean {ms(name + '_mean_s')}  p50 {ms(name + '_p50_s')}  "
              f"p90 {ms(name + '_p90_s')}  p99 {ms(name + '_p99_s')}")
    if "breakdown_prefill_mean_s" in row:
        print("TTFT breakdown (mean ms): " + ", ".join(
            f"{k.removesuffix('_s')} {ms('breakdown_' + k.removesuffix('_s') + '_mean_s')}"
            for k in BREAKDOWN))
