"""The KV hand-off between real Serve replicas (random:tiny-llama on CPU, object-store
backend), with the prefill's KV writes deliberately slowed (``handoff_fakes``): token 0 comes
while the transfer is in flight, clients that leave before or after token 0 leave no block,
lease or task behind, and a prefill replica killed mid-transfer ends its request with an
error within its deadline, never decoding from partial KV.

Leases and deadlines are set far above the tests' own deadlines (an hour), so a leak cannot
hide by expiring before the test looks.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
import ray.cloudpickle
from ray import serve

MODEL = "random:tiny-llama"
APP, ROUTE = "handoff", "/handoff"
PROMPT = list(range(20, 120))  # 100 tokens: disaggregated (local below 8)
LAYER_DELAY_S = 0.5  # 4 layers: token 0 after ~2 s
FINISH_DELAY_S = 4.0  # the KV is confirmed ~4 s after token 0
CANCEL_GRACE_S = 1.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def handoff_app(serve_app):
    import handoff_fakes

    from deployments.app import _options
    from deployments.config import AppConfig
    from deployments.decode_server import DecodeServer
    from deployments.ingress import OpenAIIngress

    ray.cloudpickle.register_pickle_by_value(handoff_fakes)  # replicas cannot import tests/
    config = AppConfig.model_validate({
        "model": MODEL, "local_prefill_max_tokens": 8, "health_check_period_s": 1.0,
        "prefill": {"num_cpus": 0.2, "lease_s": HOUR},
        "decode": {"num_cpus": 0.2, "kv_cache_gib": 0.01, "remote_kv_timeout_s": HOUR,
                   "cancel_grace_s": CANCEL_GRACE_S},
        "ingress": {"num_cpus": 0.1}})
    prefill = serve.deployment(handoff_fakes.SlowPrefillServer).options(
        name="PrefillServer", **_options(config.prefill, config)).bind(
        config, LAYER_DELAY_S, FINISH_DELAY_S)
    decode = DecodeServer.options(**_options(config.decode, config)).bind(config, prefill)
    ingress = OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode)
    serve.run(ingress, name=APP, route_prefix=ROUTE)
    yield serve_app + ROUTE
    serve.delete(APP)
    ray.cloudpickle.unregister_pickle_by_value(handoff_fakes)


def stats():
    decode = serve.get_deployment_handle("DecodeServer", APP).stats.remote().result()
    prefill = serve.get_deployment_handle("PrefillServer", APP).stats.remote().result()
    return decode, prefill


def wait_for_baseline(deadline_s: float = 30.0):
    """Liveness deadline, not a speed bound: every block free, none fenced, no lease, no
    request left on either side."""
    end = time.monotonic() + deadline_s
    while True:
        decode, prefill = stats()
        if (decode.num_free_blocks == decode.num_total_blocks and decode.num_fenced_blocks == 0
                and not decode.has_unfinished and prefill.num_leases == 0
                and prefill.num_running == 0):
            return decode, prefill
        assert time.monotonic() < end, f"not back to baseline: {decode} {prefill}"
        time.sleep(0.2)


def body(max_tokens: int = 6, **extra) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, **extra}


def events(response):
    for line in response.iter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[len("data: "):])


def test_token_0_arrives_while_the_kv_transfer_is_in_flight(handoff_app):
    wait_for_baseline()
    with httpx.stream("POST", f"{handoff_app}/v1/completions", timeout=120,
                      json=body(stream_options={"include_usage": True})) as response:
        assert response.headers["x-disagg-path"] == "disaggregated"
        stream = events(response)
        first = next(stream)
        assert first["choices"][0]["text"] is not None
        _, prefill = stats()
        assert prefill.num_running == 1  # its KV is not confirmed yet: the writer is still busy
        rest = list(stream)
    choices = [e for e in rest if e["choices"]]
    assert len(choices) == 5 and choices[-1]["choices"][0]["finish_reason"] == "length"
    timing = rest[-1]["usage"]["disagg_timing"]
    assert timing["kv_backend"] == "object_store"
    assert timing["kv_bytes"] == len(PROMPT) * 2 * 4 * 2 * 16 * 4  # K+V, 4 layers, 2x16 fp32
    assert timing["transfer_s"] >= FINISH_DELAY_S * 0.9  # the wait the writer imposed
    # Token 0's path, hop by hop, on the wall clock of this one machine: in order, and the
    # prefill worker's share is the queue and prefill the breakdown reports.
    marks = timing["marks"]
    path = ["ingress_received", "ingress_parsed", "ingress_sent", "decode_received",
            "decode_reserved", "prefill_received", "prefill_started", "prefill_token0",
            "decode_token0", "ingress_token0"]
    times = [marks[m] for m in path]
    assert times == sorted(times), marks
    prefill_worker_s = marks["prefill_token0"] - marks["prefill_received"]
    assert prefill_worker_s >= timing["prefill_s"]
    assert marks["ingress_token0"] - marks["ingress_received"] >= \
        timing["queue_s"] + timing["prefill_s"]
    wait_for_baseline()


@pytest.mark.parametrize("leave_after", ["before_token_0", "after_token_0"])
def test_a_client_that_leaves_leaves_nothing_behind(handoff_app, leave_after):
    wait_for_baseline()
    before = stats()[0]
    with httpx.stream("POST", f"{handoff_app}/v1/completions", timeout=120,
                      json=body(max_tokens=200)) as response:
        if leave_after == "before_token_0":
            time.sleep(LAYER_DELAY_S * 1.5)  # prefill is mid-forward
        else:
            next(events(response))
    decode, _ = wait_for_baseline(deadline_s=30.0)  # far below the hour-long leases
    assert decode.num_forwards == before.num_forwards  # it never decoded


def test_a_prefill_replica_killed_mid_transfer_fails_its_request(handoff_app):
    wait_for_baseline()
    with httpx.stream("POST", f"{handoff_app}/v1/completions", timeout=120,
                      json=body(max_tokens=50)) as response:
        stream = events(response)
        next(stream)  # token 0; the KV is still being confirmed
        t_kill = time.monotonic()
        _kill_prefill_replicas()
        rest = list(stream)
    assert time.monotonic() - t_kill < 60  # liveness: the request ends within its deadline
    error = rest[-1]["error"]
    assert "KV" in error["message"] and error["code"]
    assert not [e for e in rest if e.get("choices")]  # nothing decoded from partial KV
    decode, _ = wait_for_baseline(deadline_s=90.0)  # Serve replaces the replica
    assert decode.num_free_blocks == decode.num_total_blocks


def _kill_prefill_replicas() -> None:
    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "PrefillServer" in actor["name"] and APP in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed += 1
    assert killed == 1, ray.util.list_named_actors(all_namespaces=True)

