"""Fault: KV transfers stalled past their deadline, under load (CI). 20 concurrent clients on
the real app (conftest.py): 16 disaggregated streams whose KV moves normally, and 4 whose
pull never completes (the test fake ``StalledPullReceiver``: the objects never arrive on the
decode node). Decode's pull deadline (``decode.remote_kv_timeout_s``) must fire: each stalled
request ends with a clear error -- token 0 was already streamed, so an SSE error event; a
whole (non-streamed) one gets an HTTP error -- within its deadline; the other 16 complete in
full; and blocks, leases and reservations return to baseline, read from the replicas' own
counters, well before a lease would expire (the stalled KV's lease is released by decode, not
left to ``prefill.lease_s``)."""

from __future__ import annotations

import asyncio

import httpx
from fault_fakes import STALL_PROMPT_TOKENS
from faultlib import PULL_DEADLINE_S, RESULTS, body, counts, stats, stream, wait_baseline

from deployments.config import PrefillSettings

NUM_HEALTHY, NUM_STALLED_STREAMED, NUM_STALLED_WHOLE = 16, 3, 1
REQUEST_DEADLINE_S = PULL_DEADLINE_S + 90.0  # liveness: ends (either way) by then


def _stalled_pulls(app: str) -> tuple[int, int]:
    from ray import serve

    handle = serve.get_deployment_handle("DecodeServer", app)
    return handle.stalled_pulls.remote().result(timeout_s=30)


def test_a_stalled_pull_fails_at_its_deadline_and_the_others_are_unaffected(fault_app):
    url, app = fault_app
    wait_baseline(app)
    stalled_before, _ = _stalled_pulls(app)

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_DEADLINE_S,
                                     limits=limits) as client:
            healthy = [stream(client, body(i), REQUEST_DEADLINE_S) for i in range(NUM_HEALTHY)]
            stalled = [stream(client, body(100 + i, STALL_PROMPT_TOKENS, stream=i >= 1),
                              REQUEST_DEADLINE_S)
                       for i in range(NUM_STALLED_STREAMED + NUM_STALLED_WHOLE)]
            return await asyncio.gather(asyncio.gather(*healthy), asyncio.gather(*stalled))

    healthy, stalled = asyncio.run(main())
    assert counts(healthy)["completed"] == NUM_HEALTHY, healthy
    whole, streamed = stalled[:NUM_STALLED_WHOLE], stalled[NUM_STALLED_WHOLE:]
    for o in streamed:  # token 0 went out (200); the pull deadline ends it with an SSE event
        assert o.kind == "error_event" and o.detail == "kv_transfer_failed", o
        assert "timed out" in o.message, o
    for o in whole:
        assert o.kind == "error_status" and o.detail == "500 kv_transfer_failed", o
        assert "timed out" in o.message, o
    # Half a lease: the stalled KV's lease released by decode, not by the lease expiring.
    baseline_s = wait_baseline(app, deadline_s=PrefillSettings().lease_s / 2)
    RESULTS["stalled_pull"] = {
        "healthy": counts(healthy), "stalled": counts(stalled),
        "stalled_slowest_s": round(max(o.seconds for o in stalled), 2),
        "healthy_slowest_s": round(max(o.seconds for o in healthy), 2),
        "baseline_after_s": round(baseline_s, 2)}
    print("stalled", RESULTS["stalled_pull"])
    stalled_after, held = _stalled_pulls(app)
    assert stalled_after - stalled_before == len(stalled) and held == 0  # exactly those
    decode, prefill = stats(app)
    assert decode.num_fenced_blocks == 0 and prefill.num_running == 0
