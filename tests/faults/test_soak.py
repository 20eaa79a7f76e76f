"""The CI soak (issue 17): 500 requests at concurrency 32 on the real app with the shipped
deadlines (conftest.py ``soak_app``, ``random:tiny-llama``) -- short prompts decode prefills
itself and long disaggregated ones, streamed and whole, every 10th cancelled by its client
mid-way. No unexpected error, and every KV block, lease and fence back at the end (read from the
replicas' own counters) well before a lease would expire: cancellations free their work, the
lease clock does not."""

from __future__ import annotations

import asyncio
import time

from faultlib import RESULTS, soak, stats, wait_baseline

from deployments.config import PrefillSettings

NUM_REQUESTS, CONCURRENCY = 500, 32
REQUEST_DEADLINE_S = 120.0  # liveness, per request


def test_soak_500_at_concurrency_32(soak_app):
    url, app = soak_app
    wait_baseline(app)
    _, prefill_before = stats(app)
    t0 = time.monotonic()
    each: list[float] = []
    outcomes = asyncio.run(soak(url, NUM_REQUESTS, CONCURRENCY, REQUEST_DEADLINE_S,
                                seconds=each))
    seconds = time.monotonic() - t0
    each.sort()
    unexpected = [o for o in outcomes if o not in ("ok", "cancelled")]
    assert not unexpected, (unexpected[:5], f"slowest request seconds {each[-5:]}")
    assert len(outcomes) == NUM_REQUESTS
    assert outcomes.count("cancelled") == NUM_REQUESTS // 10
    baseline_s = wait_baseline(app, deadline_s=PrefillSettings().lease_s / 2)
    RESULTS["soak"] = {"requests": NUM_REQUESTS, "concurrency": CONCURRENCY,
                       "ok": outcomes.count("ok"), "cancelled": outcomes.count("cancelled"),
                       "unexpected": len(unexpected), "seconds": round(seconds, 1),
                       "request_s_p50": round(each[len(each) // 2], 2),
                       "request_s_p99": round(each[int(len(each) * 0.99)], 2),
                       "request_s_max": round(each[-1], 2),
                       "baseline_after_s": round(baseline_s, 2)}
    print("soak", RESULTS["soak"])
    decode, prefill = stats(app)
    assert decode.num_fenced_blocks == 0 and prefill.num_running == 0
    assert prefill.num_prefills > prefill_before.num_prefills  # the long ones went remote
