"""Fault injection under load (``slow``: run by hand, numbers in benchmarks/RESULTS.md,
"Reliability"). The real app (``random:tiny-llama``, every prompt disaggregated, one Serve
app for the module) serves ~20 concurrent streaming clients while a replica is killed:

- the prefill replica, with prompts queued and in prefill;
- the decode replica, mid-stream.

Every request must complete or end with a clear error (an HTTP error in the OpenAI shape, or
an SSE error event) within its deadline -- none hangs, none is cut without a word -- Serve
brings the replica back (recovery: kill -> the first good answer after it), and the KV blocks
and leases return to baseline, read from the replicas' own counters. ``DISAGG_FAULTS_JSON``
names a file for the numbers. Every wait is a liveness deadline, not a speed bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import pytest
from helpers import own_serve_app

from benchmarks.common import write_results
from deployments.config import PrefillSettings

pytestmark = pytest.mark.slow

MODEL = "random:tiny-llama"
NUM_CLIENTS = 20
PROMPT_TOKENS = 600
MAX_TOKENS = 48
REQUEST_DEADLINE_S = 120.0  # per request: completes or fails clearly by then
RECOVERY_DEADLINE_S = 180.0
_results: dict[str, dict] = {}


@pytest.fixture(scope="module")
def app_url():
    from deployments.config import AppConfig

    config = AppConfig(model=MODEL, local_prefill_max_tokens=8, health_check_period_s=1.0)
    with own_serve_app(config, "faults") as url:
        yield url
    path = os.environ.get("DISAGG_FAULTS_JSON")
    if path and _results:
        write_results("faults_cpu", [{"fault": k, **v} for k, v in _results.items()],
                      out=Path(path), extra={"model": MODEL, "num_clients": NUM_CLIENTS,
                                             "prompt_tokens": PROMPT_TOKENS,
                                             "max_tokens": MAX_TOKENS})


@dataclass
class Outcome:
    kind: str  # completed | error_status | error_event | hung | cut
    seconds: float
    detail: str = ""


def _body(seed: int) -> dict:
    prompt = [(seed * 7 + i) % 500 + 3 for i in range(PROMPT_TOKENS)]
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True,
            "ignore_eos": True, "temperature": 0}


async def _stream(client: httpx.AsyncClient, seed: int) -> Outcome:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            async with client.stream("POST", "/v1/completions", json=_body(seed)) as r:
                if r.status_code != 200:
                    error = json.loads(await r.aread())["error"]
                    assert error["message"] and error["type"], error
                    return Outcome("error_status", time.monotonic() - t0,
                                   f"{r.status_code} {error['code']}")
                finish, tokens = None, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        kind = "completed" if finish == "length" and tokens == MAX_TOKENS \
                            else "cut"
                        return Outcome(kind, time.monotonic() - t0, f"{tokens} tokens")
                    data = json.loads(line[6:])
                    if "error" in data:
                        return Outcome("error_event", time.monotonic() - t0,
                                       str(data["error"]["code"]))
                    if data["choices"]:
                        tokens += 1
                        finish = data["choices"][0]["finish_reason"] or finish
                return Outcome("cut", time.monotonic() - t0, "no [DONE]")
    except TimeoutError:
        return Outcome("hung", time.monotonic() - t0)
    except httpx.HTTPError as e:
        return Outcome("cut", time.monotonic() - t0, repr(e))


def _replica_actor(deployment: str):
    import ray
    from ray.util import list_named_actors

    names = [a for a in list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def _stats():
    from ray import serve

    decode = serve.get_deployment_handle("DecodeServer", "faults").stats.remote().result(
        timeout_s=30)
    prefill = serve.get_deployment_handle("PrefillServer", "faults").stats.remote().result(
        timeout_s=30)
    return decode, prefill


def _wait_baseline(deadline_s: float = 120.0) -> float:
    """Seconds until every KV block is free, no request unfinished and no lease held."""
    t0, last = time.monotonic(), None
    while True:
        try:
            last = _stats()
            decode, prefill = last
            if decode.num_free_blocks == decode.num_total_blocks and not decode.has_unfinished \
                    and prefill.num_leases == 0:
                return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 (a replica still restarting)
            last = e
        assert time.monotonic() - t0 < deadline_s, f"KV blocks or leases never returned: {last}"
        time.sleep(0.5)


async def _recovered(client: httpx.AsyncClient, t_kill: float) -> float:
    """Seconds from the kill until a fresh request is answered in full."""
    while True:
        assert time.monotonic() - t_kill < RECOVERY_DEADLINE_S, "the service did not recover"
        outcome = await _stream(client, seed=999)
        if outcome.kind == "completed":
            return time.monotonic() - t_kill
        await asyncio.sleep(0.5)


def _run_with_kill(app_url: str, deployment: str, kill_after_s: float) -> dict:
    import ray

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S,
                                     limits=limits) as client:
            tasks = [asyncio.create_task(_stream(client, i)) for i in range(NUM_CLIENTS)]
            await asyncio.sleep(kill_after_s)
            actor = _replica_actor(deployment)
            t_kill = time.monotonic()
            ray.kill(actor, no_restart=True)  # Serve's controller replaces the replica
            outcomes = await asyncio.gather(*tasks)
            recovery_s = await _recovered(client, t_kill)
            return outcomes, recovery_s

    _wait_baseline()
    outcomes, recovery_s = asyncio.run(main())
    baseline_s = _wait_baseline()
    counts = {k: sum(o.kind == k for o in outcomes)
              for k in ("completed", "error_status", "error_event", "hung", "cut")}
    row = {**counts, "recovery_s": round(recovery_s, 2), "baseline_after_s": round(baseline_s, 2),
           "slowest_s": round(max(o.seconds for o in outcomes), 2),
           "outcomes": [asdict(o) for o in outcomes]}
    _results[deployment] = row
    print(deployment, {k: v for k, v in row.items() if k != "outcomes"})
    return row


def _warm(app_url: str) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S) as client:
            assert (await _stream(client, 1)).kind == "completed"

    asyncio.run(main())


SOAK_REQUESTS, SOAK_CONCURRENCY = 500, 32


def test_soak_mixed_paths_streams_and_cancellations(app_url):
    """500 requests at concurrency 32: short prompts (decode prefills them) and long ones
    (disaggregated), streamed and whole, every 10th cancelled by its client mid-way. No
    unexpected error, and every block and lease back at the end."""
    _warm(app_url)
    _wait_baseline()
    outcomes: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {**_body(i), "max_tokens": 8, "stream": i % 2 == 0}
        if i % 3 == 0:
            body["prompt"] = body["prompt"][:5]  # under local_prefill_max_tokens: local path
        if i % 10 == 9:  # the client leaves mid-way
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(0.05 * (i % 7))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task
            outcomes.append("cancelled")
            return
        r = await client.post("/v1/completions", json=body)
        ok = r.status_code == 200 and (not body["stream"] or r.text.endswith("data: [DONE]\n\n"))
        outcomes.append("ok" if ok else f"{r.status_code} {r.text[:200]}")

    async def main():
        sem = asyncio.Semaphore(SOAK_CONCURRENCY)

        async def bounded(client, i):
            async with sem:
                await one(client, i)

        async with httpx.AsyncClient(base_url=app_url, timeout=REQUEST_DEADLINE_S,
                                     limits=httpx.Limits(max_connections=SOAK_CONCURRENCY)) as c:
            await asyncio.gather(*(bounded(c, i) for i in range(SOAK_REQUESTS)))

    t0 = time.monotonic()
    asyncio.run(main())
    seconds = time.monotonic() - t0
    baseline_s = _wait_baseline()
    unexpected = [o for o in outcomes if o not in ("ok", "cancelled")]
    _results["soak"] = {"requests": SOAK_REQUESTS, "concurrency": SOAK_CONCURRENCY,
                        "ok": outcomes.count("ok"), "cancelled": outcomes.count("cancelled"),
                        "unexpected": len(unexpected), "seconds": round(seconds, 1),
                        "baseline_after_s": round(baseline_s, 2)}
    print("soak", _results["soak"])
    assert not unexpected, unexpected[:5]
    assert len(outcomes) == SOAK_REQUESTS


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


def test_clients_leaving_before_their_first_token_free_everything(app_url):
    """Clients that disconnect while their prompts are queued or in prefill: every block and
    lease comes back well before a lease would expire (``prefill.lease_s``)."""
    _warm(app_url)
    _wait_baseline()
    headers_seen = [False] * NUM_CLIENTS

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", "/v1/completions", json=_body(i)) as r:
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
    _wait_baseline(deadline_s=PrefillSettings().lease_s / 2)
    left_before_first_token = headers_seen.count(False)
    _results["disconnect_before_first_token"] = {
        "clients": NUM_CLIENTS, "left_before_first_token": left_before_first_token,
        "baseline_after_s": round(time.monotonic() - t0, 2)}
    print("disconnect", _results["disconnect_before_first_token"])
    assert left_before_first_token > 0, "every client had its first token: nothing tested"
