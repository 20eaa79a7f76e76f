"""Fault injection under load (``slow``: ``make test-slow``, numbers in benchmarks/RESULTS.md,
"Reliability"). The real app (``random:tiny-llama``, every prompt disaggregated, one Serve
app for the module) serves ~20 concurrent streaming clients while a replica is killed:

- the prefill replica, with prompts queued and in prefill;
- the decode replica, mid-stream;
- an ingress replica, mid-stream (the app runs the shipped YAML's ingress settings: two
  replicas, so fresh requests are served by the other one);
- every ingress replica: fresh requests past ``ingress.max_queued_requests`` get Serve's 503
  with ``Retry-After`` at once.

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
import yaml
from faultlib import (
    MAX_TOKENS,
    MODEL,
    PROMPT_TOKENS,
    answered_by_proxy,
    body,
    counts,
    replica_actors,
    stream,
    wait_baseline,
)
from helpers import REPO_ROOT, own_serve_app

from benchmarks.common import write_results
from deployments.config import PrefillSettings

pytestmark = pytest.mark.slow

APP = "faults"
NUM_CLIENTS = 20
REQUEST_DEADLINE_S = 120.0  # per request: completes or fails clearly by then
RECOVERY_DEADLINE_S = 180.0
_results: dict[str, dict] = {}


def _shipped_ingress() -> dict:
    """The ingress settings of the YAML users run (its replica count and queue bound)."""
    shipped = yaml.safe_load((REPO_ROOT / "deployments" / "prefill_decode.yaml").read_text())
    ingress = shipped["applications"][0]["args"]["ingress"]
    return {k: v for k, v in ingress.items() if k in ("num_replicas", "max_queued_requests")}


@pytest.fixture(scope="module")
def app_url():
    from deployments.config import AppConfig

    config = AppConfig(model=MODEL, local_prefill_max_tokens=8, health_check_period_s=1.0,
                       ingress=_shipped_ingress())
    with own_serve_app(config, APP) as url:
        yield url
    path = os.environ.get("DISAGG_FAULTS_JSON")
    if path and _results:
        write_results("faults_cpu", [{"fault": k, **v} for k, v in _results.items()],
                      out=Path(path), extra={"model": MODEL, "num_clients": NUM_CLIENTS,
                                             "prompt_tokens": PROMPT_TOKENS,
                                             "max_tokens": MAX_TOKENS})


def _running_replicas(deployment: str) -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[deployment].replica_states.get(
        "RUNNING", 0)


def _replaced_s(deployment: str, t_kill: float, num_replicas: int) -> float:
    """Seconds from the kill until Serve reports the killed replica replaced: fewer than
    ``num_replicas`` running (the death noticed), then all of them again."""
    noticed = False
    while time.monotonic() - t_kill < RECOVERY_DEADLINE_S:
        running = _running_replicas(deployment)
        noticed = noticed or running < num_replicas
        if noticed and running == num_replicas:
            return time.monotonic() - t_kill
        time.sleep(0.05)
    raise AssertionError(f"{deployment}: the killed replica was not replaced")


async def _probe(client: httpx.AsyncClient, t_kill: float) -> dict:
    """A fresh one-token request sent right after the kill: how it was answered, and when,
    against when Serve had replaced the killed replica (answered before that: another
    replica served it; with a single replica it can only be answered after)."""
    replaced = asyncio.create_task(asyncio.to_thread(
        _replaced_s, "OpenAIIngress", t_kill, _shipped_ingress()["num_replicas"]))
    outcome = await stream(client, body(998, prompt_tokens=4, max_tokens=1, stream=False),
                           REQUEST_DEADLINE_S)
    answered_s = time.monotonic() - t_kill
    return {"kind": outcome.kind, "detail": outcome.detail,
            "answered_after_kill_s": round(answered_s, 2),
            "replaced_after_kill_s": round(await replaced, 2)}


async def _recovered(client: httpx.AsyncClient, t_kill: float) -> tuple[float, list[dict]]:
    """Seconds from the kill until a fresh request is answered in full, and how each fresh
    request before that failed (clearly: each is classified), when sent and how fast."""
    failed = []
    while True:
        assert time.monotonic() - t_kill < RECOVERY_DEADLINE_S, "the service did not recover"
        sent_s = time.monotonic() - t_kill
        outcome = await stream(client, body(999), REQUEST_DEADLINE_S)
        if outcome.kind == "completed":
            return time.monotonic() - t_kill, failed
        assert outcome.kind != "hung", outcome
        failed.append({"sent_s": round(sent_s, 2), "answered_s": round(outcome.seconds, 2),
                       "kind": outcome.kind, "detail": outcome.detail,
                       "message": outcome.message[:100]})
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
            actor = replica_actors(deployment, APP)[0]
            t_kill = time.monotonic()
            ray.kill(actor, no_restart=True)  # Serve's controller replaces the replica
            probe = await _probe(client, t_kill) if deployment == "OpenAIIngress" else None
            outcomes = await asyncio.gather(*tasks)
            recovery_s, failed_after = await _recovered(client, t_kill)
            return outcomes, recovery_s, failed_after, probe

    wait_baseline(APP)
    outcomes, recovery_s, failed_after, probe = asyncio.run(main())
    # Half a lease: work of the killed replica's requests freed, not left to the lease clock.
    baseline_s = wait_baseline(APP, deadline_s=PrefillSettings().lease_s / 2) \
        if deployment == "OpenAIIngress" else wait_baseline(APP)
    row = {**counts(outcomes), "recovery_s": round(recovery_s, 2),
           "fresh_failed_before_recovery": len(failed_after), "fresh_failed": failed_after,
           "probe_after_kill": probe,
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
    assert not answered_by_proxy(row["outcomes"]), row  # the ingress answered each


def test_kill_decode_mid_stream(app_url):
    _warm(app_url)
    row = _run_with_kill(app_url, "DecodeServer", kill_after_s=2.0)
    assert row["hung"] == 0 and row["cut"] == 0, row
    assert row["completed"] + row["error_status"] + row["error_event"] == NUM_CLIENTS
    assert not answered_by_proxy(row["outcomes"]), row  # the ingress answered each


def test_kill_ingress_mid_stream(app_url):
    """The ingress is the one that writes errors: with it gone, a client's stream ends
    without ``data: [DONE]`` (the connection closed, or the proxy's own error), never hangs;
    a fresh request sent right after the kill is served in full by the other ingress replica
    (the shipped YAML runs two) before Serve has replaced the killed one -- with one, it
    waited at the proxy in silence until the new ingress was up; fresh requests succeed, and
    the decode and prefill work of the lost streams is freed (its callers are gone) well
    before a lease expires."""
    _warm(app_url)
    num_ingress = _shipped_ingress()["num_replicas"]
    assert num_ingress >= 2
    row = _run_with_kill(app_url, "OpenAIIngress", kill_after_s=2.0)
    probe = row["probe_after_kill"]
    assert probe["kind"] == "completed", probe
    assert probe["answered_after_kill_s"] < probe["replaced_after_kill_s"], probe
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


def test_with_no_ingress_alive_the_proxy_answers_503_at_once_past_its_bound(app_url):
    """Every ingress replica killed: Serve's proxy holds fresh requests for the replacements
    (it has no way to refuse them all while none is alive), but only up to
    ``ingress.max_queued_requests``: the ones past it get a 503 with ``Retry-After`` (Serve's
    own plain-text body) while no ingress replica is running yet; the held ones are served
    once one is back, none hangs."""
    import ray

    from deployments.config import AppConfig

    _warm(app_url)
    wait_baseline(APP)
    bound = AppConfig(ingress=_shipped_ingress()).ingress.max_queued_requests
    num_fresh = bound + 16

    async def main():
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S,
                                     limits=httpx.Limits(max_connections=num_fresh)) as c:
            t_kill = time.monotonic()
            for actor in replica_actors("OpenAIIngress", APP):
                ray.kill(actor, no_restart=True)
            replaced = asyncio.create_task(asyncio.to_thread(
                _replaced_s, "OpenAIIngress", t_kill, _shipped_ingress()["num_replicas"]))
            outcomes = await asyncio.gather(*(
                stream(c, body(700 + i, prompt_tokens=4, max_tokens=1, stream=False),
                       REQUEST_DEADLINE_S) for i in range(num_fresh)))
            return outcomes, time.monotonic() - t_kill, await replaced

    outcomes, seconds, replaced_s = asyncio.run(main())
    shed = [o for o in outcomes if o.detail == "503 proxy retry-after 1"]
    row = {**counts(outcomes), "fresh": num_fresh, "bound": bound, "shed_503": len(shed),
           "shed_slowest_s": round(max((o.seconds for o in shed), default=0.0), 2),
           "held_slowest_s": round(max(o.seconds for o in outcomes if o.kind == "completed"),
                                   2),
           "replaced_after_kill_s": round(replaced_s, 2), "all_ended_s": round(seconds, 2),
           "other_errors": sorted({o.detail for o in outcomes
                                   if o.kind != "completed" and o not in shed})}
    _results["no_ingress_alive"] = row
    print("no ingress alive", row)
    assert row["hung"] == 0, row
    # Refused before any ingress replica was back: at once, not after the wait for one (the
    # requests were all sent at the kill, so their seconds are seconds after it).
    assert shed and row["shed_slowest_s"] < replaced_s, row
    assert row["completed"] >= 1, row
    wait_baseline(APP)
