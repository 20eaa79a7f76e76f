"""Drive one run: send each ``WorkItem`` at its arrival time (open loop) or as soon as one of
``max_concurrency`` slots frees (closed loop), with a progress line on stderr.

Arrivals are scheduled against the run's start (not after the previous send), so a slow
response never delays later arrivals; ``scheduled_s`` vs ``start_s`` shows any client lag.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from benchmarks.loadgen.client import RequestResult, RequestSpec, send
from benchmarks.loadgen.workload import WorkItem


@dataclass(frozen=True)
class RunConfig:
    max_concurrency: int | None = None  # None: unbounded (open loop)
    timeout_s: float = 600.0
    progress: bool = True


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.done = self.failed = 0
        self._t0 = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.success
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self._t0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
                         f" done, {self.failed} failed, {elapsed:.1f} s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def run(items: list[WorkItem], make_spec: Callable[[WorkItem], RequestSpec],
              config: RunConfig = RunConfig()) -> list[RequestResult]:
    """Send every item and return one result per item, in item order."""
    specs = [make_spec(w) for w in items]  # prompts are built before the clock starts
    results = [RequestResult(w.index, w.prompt_tokens, w.output_tokens, scheduled_s=w.arrival_s)
               for w in items]
    progress = Progress(len(items), config.progress)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        t0 = time.perf_counter()

        async def one(item: WorkItem, spec: RequestSpec, result: RequestResult) -> None:
            if item.arrival_s is not None:
                delay = t0 + item.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if slots is None:
                await send(session, spec, result, t0, config.timeout_s)
            else:
                async with slots:
                    await send(session, spec, result, t0, config.timeout_s)
            progress.update(result)

        await asyncio.gather(*(one(w, s, r) for w, s, r in zip(items, specs, results)))
    return results


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model ``/v1/models`` lists (the default ``--model``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (aiohttp.ClientSession(trust_env=False) as session,
                session.get(f"{base_url}/v1/models", headers=headers) as resp):
        resp.raise_for_status()
        data = await resp.json()
    return data["data"][0]["id"]
