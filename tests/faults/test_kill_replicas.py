"""Fault injection under load (``slow``: ``make test-slow``, numbers in benchmarks/RESULTS.md,
"Reliability"). The real app (``random:tiny-llama``, every prompt disaggregated, one Serve
app for the module) serves ~20 concurrent streaming clients while a replica is killed:

- the prefill replica, with prompts queued and in prefill;
- the decode replica, mid-stream;
- the ingress replica, mid-stream.

Every request must complete or end with a clear error (an HTTP error in the OpenAI shape, or
an SSE error event; with the ingress itself gone, the connection closed before
``data: [DONE]``) within its deadline -- none hangs, none is cut without a word while its
ingress lives -- Serve brings the replica back (recovery: kill -> the first good answer after
it), and the KV blocks and leases return to baseline, read from the replicas' own counters.
``DISAGG_FAULTS_JSON`` names a file for the numbers. Every wait is a liveness deadline, not a
speed bound.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from faultlib import (
    MAX_TOKENS,
    MODEL,
    PROMPT_TOKENS,
    body,
    counts,
    replica_actor,
    stream,
    wait_baseline,
)
from helpers import own_serve_app

from benchmarks.common import write_results
from deployments.config import PrefillSettings

pytestmark = pytest.mark.slow

APP = "faults"
NUM_CLIENTS = 20
REQUEST_DEADLINE_S = 120.0  # per request: completes or fails clearly by then
RECOVERY_DEADLINE_S = 180.0
_results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def app_url():
    from deployments.config import AppConfig

    config = AppConfig(model=MODEL, local_prefill_max_tokens=8, health_check_period_s=1.0)
    with own_serve_app(config, APP) as url:
        yield url
    path = os.environ.get("DISAGG_FAULTS_JSON")
    if path and _results:
        write_results("faults_cpu", [{"fault": k, **v} for k, v in _results.items()],
                      out=Path(path), extra={"model": MODEL, "num_clients": NUM_CLIENTS,
                                             "prompt_tokens": PROMPT_TOKENS,
                                             "max_tokens": MAX_TOKENS})


async def _recovered(client: httpx.AsyncClient, t_kill: float) -> tuple[float, int]:
    """Seconds from the kill until a fresh request is answered in full, and how many fresh
    requests failed (clearly: each is classified) before that."""
    failed = 0
    while True:
        assert time.monotonic() - t_kill < RECOVERY_DEADLINE_S, "the service did not recover"
        outcome = await stream(client, body(999), REQUEST_DEADLINE_S)
        if outcome.kind == "completed":
            return time.monotonic() - t_kill, failed
        assert outcome.kind != "hung", outcome
        failed += 1
        await asyncio.sleep(0.5)


def _run_with_kill(app_url: str, deployment: str, kill_after_s: float) -> dict:
    import ray

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S,
                                     limits=limits) as client:
            tasks = [asyncio.create_task(stream(client, body(i), REQUEST_DEADLINE_S))
                     for i in range(NUM_CLIENTS)]
            await asyncio.sleep(kill_after_s)
            actor = replica_actor(deployment, APP)
            t_kill = time.monotonic()
            ray.kill(actor, no_restart=True)  # Serve's controller replaces the replica
            outcomes = await asyncio.gather(*tasks)
            recovery_s, failed_after = await _recovered(client, t_kill)
            return outcomes, recovery_s, failed_after

    wait_baseline(APP)
    outcomes, recovery_s, failed_after = asyncio.run(main())
    # Half a lease: work of the killed replica's requests freed, not left to the lease clock.
    baseline_s = wait_baseline(APP, deadline_s=PrefillSettings().lease_s / 2) \
        if deployment == "OpenAIIngress" else wait_baseline(APP)
    row = {**counts(outcomes), "recovery_s": round(recovery_s, 2),
           "fresh_failed_before_recovery": failed_after,
           "baseline_after_s": round(baseline_s, 2),
           "slowest_s": round(max(o.seconds for o in outcomes), 2),
           "outcomes": [asdict(o) for o in outcomes]}
    _results[deployment] = row
    print(deployment, {k: v for k, v in row.items() if k != "outcomes"})
    return row


def _warm(app_url: str) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S) as client:
            assert (await stream(client, body(1), REQUEST_DEADLINE_S)).kind == "completed"

    asyncio.run(main())


def test_kill_prefill_under_load(app_url):
    _warm(app_url)
    row = _run_with_kill(app_url, "PrefillServer", kill_after_s=0.5)
    assert row["hung"] == 0 and row["cut"] == 0, row
    assert row["completed"] + row["error_status"] + row["error_event"] == NUM_CLIENTS


def test_kill_decode_mid_stream(app_url):
    _warm(app_url)
    row = _run_with_kill(app_url, "DecodeServer", kill_after_s=2.0)
    assert row["hung"] == 0 and row["cut"] == 0, row
    assert row["completed"] + row["error_status"] + row["error_event"] == NUM_CLIENTS


def test_kill_ingress_mid_stream(app_url):
    """The ingress is the one that writes errors: with it gone, a client's stream ends
    without ``data: [DONE]`` (the connection closed, or the proxy's own error), never hangs;
    Serve starts a new ingress, fresh requests succeed, and the decode and prefill work of
    the lost streams is freed (its callers are gone) well before a lease expires."""
    _warm(app_url)
    row = _run_with_kill(app_url, "OpenAIIngress", kill_after_s=2.0)
    assert row["hung"] == 0, row
    # Only the ingress writes ``[DONE]``: a short stream that ends with it would be cut
    # silently; the lost streams end with the connection (or the proxy's error) instead.
    silent = [o for o in row["outcomes"] if o["kind"] == "cut" and o["detail"].endswith("tokens")]
    assert not silent, silent
    assert sum(row[k] for k in ("completed", "error_status", "error_event", "cut")) \
        == NUM_CLIENTS


def test_clients_leaving_before_their_first_token_free_everything(app_url):
    """Clients that disconnect while their prompts are queued or in prefill: every block and
    lease comes back well before a lease would expire (``prefill.lease_s``)."""
    _warm(app_url)
    wait_baseline(APP)
    headers_seen = [False] * NUM_CLIENTS

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/completions", json=body(i)) as r:
            headers_seen[i] = True  # the ingress answers only with the first token
            async for _ in r.aiter_lines():
                pass

    async def main():
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S,
                                     limits=httpx.Limits(max_connections=NUM_CLIENTS)) as c:
            tasks = [asyncio.create_task(leave_early(c, i)) for i in range(NUM_CLIENTS)]
            await asyncio.sleep(0.3)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    t0 = time.monotonic()
    # Half a lease: blocks and leases freed by the cancellation, not by the lease expiring.
    wait_baseline(APP, deadline_s=PrefillSettings().lease_s / 2)
    left_before_first_token = headers_seen.count(False)
    _results["disconnect_before_first_token"] = {
        "clients": NUM_CLIENTS, "left_before_first_token": left_before_first_token,
        "baseline_after_s": round(time.monotonic() - t0, 2)}
    print("disconnect", _results["disconnect_before_first_token"])
    assert left_before_first_token > 0, "every client had its first token: nothing tested"
