"""What the fault tests share: streaming clients that classify how each request ended, and the
replicas' own counters read back to baseline. Every wait is a liveness deadline, not a speed
bound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import httpx

MODEL = "random:tiny-llama"
PROMPT_TOKENS = 600
MAX_TOKENS = 48
RESULTS: dict[str, dict] = {}  # rows of the CI fault tests (conftest writes them)
PULL_DEADLINE_S = 15.0  # the CI app's decode.remote_kv_timeout_s (the whole hand-off)
CANCEL_GRACE_S = 3.0  # the CI app's decode.cancel_grace_s (conftest.py says why)


@dataclass
class Outcome:
    kind: str  # completed | error_status | error_event | hung | cut
    seconds: float
    detail: str = ""
    message: str = ""


def body(seed: int, prompt_tokens: int = PROMPT_TOKENS, max_tokens: int = MAX_TOKENS,
         stream: bool = True, model: str = MODEL) -> dict:
    prompt = [(seed * 7 + i) % 500 + 3 for i in range(prompt_tokens)]
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True, "temperature": 0}


async def stream(client: httpx.AsyncClient, request: dict, deadline_s: float,
                 path: str = "/v1/completions") -> Outcome:
    """One request, streamed or whole: completed in full, a clear error (an HTTP error in the
    OpenAI shape or an SSE error event), hung past ``deadline_s``, or cut without a word."""
    t0 = time.monotonic()
    want = request["max_tokens"]
    try:
        async with asyncio.timeout(deadline_s):
            async with client.stream("POST", path, json=request) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    try:
                        error = json.loads(text)["error"]
                    except ValueError:  # Serve's proxy answered itself: its text, no JSON
                        retry = r.headers.get("retry-after")
                        return Outcome("error_status", time.monotonic() - t0,
                                       f"{r.status_code} proxy"
                                       + (f" retry-after {retry}" if retry else ""), text[:200])
                    assert error["message"] and error["type"], error
                    return Outcome("error_status", time.monotonic() - t0,
                                   f"{r.status_code} {error['code']}", error["message"])
                if not request.get("stream"):
                    whole = json.loads(await r.aread())
                    finish = whole["choices"][0]["finish_reason"]
                    full = finish == "length" and whole["usage"]["completion_tokens"] == want
                    return Outcome("completed" if full else "cut", time.monotonic() - t0, finish)
                finish, tokens = None, 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        kind = "completed" if finish == "length" and tokens == want else "cut"
                        return Outcome(kind, time.monotonic() - t0, f"{tokens} tokens")
                    data = json.loads(line[6:])
                    if "error" in data:
                        return Outcome("error_event", time.monotonic() - t0,
                                       str(data["error"]["code"]), data["error"]["message"])
                    if data["choices"]:
                        tokens += 1
                        finish = data["choices"][0]["finish_reason"] or finish
                return Outcome("cut", time.monotonic() - t0, "no [DONE]")
    except TimeoutError:
        return Outcome("hung", time.monotonic() - t0)
    except httpx.HTTPError as e:
        return Outcome("cut", time.monotonic() - t0, repr(e))


def answered_by_proxy(outcomes: list) -> list:
    """The outcomes (``Outcome`` or its dict) Serve's HTTP proxy answered itself (its plain
    text, not our OpenAI-shaped error: no ingress replica took the request, or it died)."""
    return [o for o in outcomes
            if " proxy" in (o["detail"] if isinstance(o, dict) else o.detail)]


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    return {k: sum(o.kind == k for o in outcomes)
            for k in ("completed", "error_status", "error_event", "hung", "cut")}


def stats(app: str):
    """(DecodeStats, PrefillStats) from the replicas themselves."""
    from ray import serve

    decode = serve.get_deployment_handle("DecodeServer", app).stats.remote().result(timeout_s=30)
    prefill = serve.get_deployment_handle("PrefillServer", app).stats.remote().result(
        timeout_s=30)
    return decode, prefill


def replica_actors(deployment: str, app: str | None = None) -> list:
    """The replica actors of ``deployment`` (of ``app``, if given: other apps may run), by
    name."""
    import ray
    from ray.util import list_named_actors

    tag = f"::{app}#{deployment}#" if app is not None else f"#{deployment}#"
    names = sorted((a for a in list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA") and tag in a["name"]),
                   key=lambda a: a["name"])
    assert names, f"no replica of {deployment}"
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def wait_baseline(app: str, deadline_s: float = 120.0) -> float:
    """Seconds until every KV block is free, no request unfinished and no lease held."""
    t0, last = time.monotonic(), None
    while True:
        try:
            last = stats(app)
            decode, prefill = last
            if decode.num_free_blocks == decode.num_total_blocks and not decode.has_unfinished \
                    and prefill.num_leases == 0:
                return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 (a replica still restarting)
            last = e
        assert time.monotonic() - t0 < deadline_s, f"KV blocks or leases never returned: {last}"
        time.sleep(0.5)


async def soak(base_url: str, num_requests: int, concurrency: int, deadline_s: float, *,
               model: str = MODEL, prompt_tokens: int = PROMPT_TOKENS, max_tokens: int = 8,
               on_done=None, seconds: list[float] | None = None) -> list[str]:
    """``num_requests`` at ``concurrency``: short prompts (decode prefills them) and long ones
    (disaggregated), streamed and whole, every 10th cancelled by its client mid-way. Returns
    each one's outcome: ``ok``, ``cancelled`` or what went wrong with its seconds
    (``on_done(n)`` after each; ``seconds`` gets each uncancelled request's seconds)."""
    outcomes: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        request = body(i, prompt_tokens, max_tokens, stream=i % 2 == 0, model=model)
        if i % 3 == 0:
            request["prompt"] = request["prompt"][:5]  # under local_prefill_max_tokens: local
        if i % 10 == 9:  # the client leaves mid-way
            task = asyncio.create_task(client.post("/v1/completions", json=request))
            await asyncio.sleep(0.05 * (i % 7))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task
            outcomes.append("cancelled")
            return
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json=request)
        took = time.monotonic() - t0
        if seconds is not None:
            seconds.append(took)
        ok = r.status_code == 200 and (not request["stream"]
                                       or r.text.endswith("data: [DONE]\n\n"))
        outcomes.append("ok" if ok else f"{r.status_code} after {took:.1f} s: {r.text[:200]}")

    sem = asyncio.Semaphore(concurrency)

    async def bounded(client, i):
        async with sem:
            await one(client, i)
        if on_done is not None:
            on_done(len(outcomes))

    async with httpx.AsyncClient(base_url=base_url, timeout=deadline_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*(bounded(c, i) for i in range(num_requests)))
    return outcomes
