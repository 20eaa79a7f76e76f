"""Fault: the decode replica dies after prefill published its requests' KV to the object store
and before it pulled them (CI). Four streamed requests whose pulls stall (the test fake
``StalledPullReceiver``: their objects never arrive) hold their leases in the prefill replica
-- published, the completion records taken by decode -- when the decode replica is killed.
Nothing alive will pull them: the prefill replica's lease keeper sees that the destinations'
owner (the dead replica's actor) is gone and ends them, long before the lease would expire
(``prefill.lease_s``; before this, one such lease was held 53 s). Each client's request ends
with a clear error, none hangs; Serve brings decode back and every counter returns to
baseline. Read from the replicas' own counters; every wait is a liveness deadline."""

from __future__ import annotations

import asyncio
import time

import httpx
from fault_fakes import STALL_PROMPT_TOKENS
from faultlib import (
    RESULTS,
    answered_by_proxy,
    body,
    counts,
    replica_actors,
    stats,
    stream,
    wait_baseline,
)

from deployments.config import PrefillSettings

NUM_STALLED = 4
REQUEST_DEADLINE_S = 120.0  # liveness: each ends (either way) by then
LEASE_BOUND_S = PrefillSettings().lease_s / 4  # leases ended by their owner's death, not expiry


def _prefill_leases(app: str) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("PrefillServer", app)
    return handle.stats.remote().result(timeout_s=30).num_leases


def _wait_leases(app: str, expected: int, deadline_s: float) -> float:
    t0 = time.monotonic()
    while (held := _prefill_leases(app)) != expected:
        assert time.monotonic() - t0 < deadline_s, f"{held} leases held, not {expected}"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_leases_end_when_their_decode_replica_dies_before_pulling(fault_app):
    import ray

    url, app = fault_app
    wait_baseline(app)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_DEADLINE_S) as client:
            tasks = [asyncio.create_task(stream(client, body(200 + i, STALL_PROMPT_TOKENS),
                                                REQUEST_DEADLINE_S))
                     for i in range(NUM_STALLED)]
            # Every lease published and its record with decode, whose pulls never finish.
            await asyncio.to_thread(_wait_leases, app, NUM_STALLED, REQUEST_DEADLINE_S)
            ray.kill(replica_actors("DecodeServer", app)[0], no_restart=True)
            t_kill = time.monotonic()
            freed_s = await asyncio.to_thread(_wait_leases, app, 0, LEASE_BOUND_S)
            return await asyncio.gather(*tasks), freed_s, time.monotonic() - t_kill

    outcomes, freed_s, _ = asyncio.run(main())
    assert counts(outcomes)["hung"] == 0, outcomes
    assert all(o.kind in ("error_event", "error_status") for o in outcomes), outcomes
    assert not answered_by_proxy(outcomes), outcomes  # the ingress answered each
    baseline_s = wait_baseline(app)  # the new decode replica serves; nothing else is held
    RESULTS["decode_dies_before_pull"] = {
        "stalled": counts(outcomes), "leases_freed_after_kill_s": round(freed_s, 2),
        "baseline_after_s": round(baseline_s, 2)}
    print("decode dies before pull", RESULTS["decode_dies_before_pull"])
    decode, prefill = stats(app)
    assert decode.num_fenced_blocks == 0 and prefill.num_running == 0
