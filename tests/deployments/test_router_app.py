"""Routing and admission on a real Serve app: random:tiny-llama on CPU, two prefill replicas
(their KV writes slowed by ``handoff_fakes.SlowPrefillServer``, so a long prompt holds its
replica for seconds) and one decode replica, all through ``DisaggRequestRouter``.

- Mixed traffic: short prompts are prefilled by decode, long ones remote; the long ones are
  spread over both prefill replicas by queued work (the replicas' own counters say so).
- A burst past the queue bound: the excess gets 429 + ``Retry-After`` at once, with the
  OpenAI error body; every request sent is accounted for (200 or 429, nothing else).
- Stats and health checks of a prefill replica answer while its prefill is running.
The local/remote boundary is set from the cost model (between the two prompt lengths), not
from a constant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest
import ray
import ray.cloudpickle
from ray import serve

MODEL = "random:tiny-llama"
APP, ROUTE = "routing", "/routing"
SHORT, LONG = 12, 600  # prompt tokens
LAYER_DELAY_S = 1.0  # 4 layers: a long prompt's token 0 after ~4 s
MAX_QUEUED = 2  # prompts per prefill replica (the running one included)


def _config():
    from deployments.admission import cost_model_for
    from deployments.config import AppConfig
    from disagg.models.config import ModelConfig
    from disagg.models.random_configs import RANDOM_CONFIGS

    args = {"model": MODEL, "health_check_period_s": 1.0,
            "prefill": {"num_cpus": 0.1, "num_replicas": 2},
            "decode": {"num_cpus": 0.2, "kv_cache_gib": 0.02},
            "ingress": {"num_cpus": 0.1},
            "routing": {"stats_period_s": 0.5,
                        "prefill_queue": {"max_queued_requests": MAX_QUEUED}}}
    cost = cost_model_for(AppConfig.model_validate(args),
                          ModelConfig.from_hf_dict(RANDOM_CONFIGS["tiny-llama"]))
    # Decode may pause its batch for a short prompt's prefill, not for a long one's.
    stall = (cost.prefill_s(SHORT) + cost.prefill_s(LONG)) / 2
    args["routing"]["max_decode_stall_s"] = stall
    return AppConfig.model_validate(args)


@pytest.fixture(scope="module")
def routing_app(serve_app):
    import handoff_fakes

    from deployments.app import _options, _routing
    from deployments.config import DEFAULT_POOL
    from deployments.decode_server import DecodeServer
    from deployments.ingress import OpenAIIngress
    from deployments.router import DECODE, PREFILL

    ray.cloudpickle.register_pickle_by_value(handoff_fakes)  # replicas cannot import tests/
    config = _config()
    prefill = serve.deployment(handoff_fakes.SlowPrefillServer).options(
        name="PrefillServer", **{**_options(config.prefill, config),
                                 **_routing(config, config.prefill, "PrefillServer", PREFILL)},
    ).bind(config, LAYER_DELAY_S, 0.0)
    decode = DecodeServer.options(**{**_options(config.decode, config),
                                     **_routing(config, config.decode, "DecodeServer", DECODE)},
                                  ).bind(config, {DEFAULT_POOL: prefill})
    ingress = OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode)
    serve.run(ingress, name=APP, route_prefix=ROUTE)
    yield serve_app + ROUTE
    serve.delete(APP)
    ray.cloudpickle.unregister_pickle_by_value(handoff_fakes)


def prefill_stats():
    """Each prefill replica's own counters."""
    return serve.get_deployment_handle("PrefillServer", APP).broadcast("stats").results()


def complete(base: str, num_tokens: int, start: int = 5) -> httpx.Response:
    body = {"model": MODEL, "prompt": [start + i % 400 for i in range(num_tokens)],
            "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=300)


def send_all(base: str, lengths: list[int]) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(lengths)) as pool:
        return list(pool.map(lambda n: complete(base, n), lengths))


def wait_idle(deadline_s: float = 120.0):
    """Liveness deadline: no prefill left running on any replica."""
    end = time.monotonic() + deadline_s
    while any(s.num_running for s in prefill_stats()):
        assert time.monotonic() < end, prefill_stats()
        time.sleep(0.2)


def test_mixed_traffic_short_local_long_spread_by_work(routing_app):
    wait_idle()
    before = [s.num_prefills for s in prefill_stats()]
    # Two long prompts per replica fit its queue bound: none is refused.
    lengths = [LONG, SHORT] * (2 * MAX_QUEUED)
    responses = send_all(routing_app, lengths)
    assert [r.status_code for r in responses] == [200] * len(lengths), \
        [r.text for r in responses if r.status_code != 200]
    paths = [r.headers["x-disagg-path"] for r in responses]
    assert paths == ["disaggregated" if n == LONG else "local" for n in lengths]
    served = [s.num_prefills - b for s, b in zip(prefill_stats(), before, strict=True)]
    assert len(served) == 2 and sum(served) == 2 * MAX_QUEUED
    assert max(served) - min(served) <= 1, served  # spread by queued work


def test_burst_past_the_queue_bound_gets_429_with_retry_after(routing_app):
    wait_idle()
    num_long = 4 * MAX_QUEUED + 4  # twice what the two replicas' queues hold
    responses = send_all(routing_app, [LONG] * num_long)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses]  # nothing else, no drop
    assert len(statuses) == num_long
    refused = [r for r in responses if r.status_code == 429]
    assert refused, statuses
    assert statuses.count(200) >= 2 * MAX_QUEUED  # the bound's worth was admitted
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-disagg-path"] == "none"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "queue_full"
    wait_idle()
    again = complete(routing_app, LONG)  # the queues drained: admitted again
    assert again.status_code == 200 and again.headers["x-disagg-path"] == "disaggregated"


def test_prefill_stats_and_health_answer_during_a_prefill(routing_app):
    wait_idle()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(complete, routing_app, LONG)
        end = time.monotonic() + 60
        while not any(s.num_running for s in prefill_stats()):
            assert time.monotonic() < end and not future.done()
            time.sleep(0.05)
        handle = serve.get_deployment_handle("PrefillServer", APP)
        handle.broadcast("check_health").results()
        reports = handle.broadcast("record_routing_stats").results()
        during = prefill_stats()
        assert any(s.num_running for s in during)  # answered while the prefill still ran
        assert sum(len(r["queue"]) for r in reports) == 1
        assert future.result().status_code == 200


class FakeStalledStream:
    """Test fake of a decode stream that never yields: records its cancellation."""

    def __init__(self):
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


def test_a_request_past_its_timeout_ends_with_504_and_is_cancelled():
    from deployments.ingress import next_item

    stream = FakeStalledStream()
    item = asyncio.run(next_item(stream, deadline=time.monotonic() + 0.05))
    assert item.finished and item.error.status == 504 and item.error.code == "timeout"
    assert stream.cancelled


@pytest.mark.slow
def test_prefill_autoscales_on_its_queue_signal(serve_app):
    """Serve's autoscaler, fed by the prefill replicas' ``load`` (queued prefill seconds),
    adds a replica while long prompts queue. Liveness deadline only."""
    import handoff_fakes

    from deployments.app import _options, _routing
    from deployments.config import DEFAULT_POOL, AppConfig
    from deployments.decode_server import DecodeServer
    from deployments.ingress import OpenAIIngress
    from deployments.router import DECODE, PREFILL

    ray.cloudpickle.register_pickle_by_value(handoff_fakes)
    config = AppConfig.model_validate({
        "model": MODEL, "health_check_period_s": 1.0, "local_prefill_max_tokens": 64,
        "prefill": {"num_cpus": 0.1, "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "target": 1e-4, "upscale_delay_s": 0}},
        "decode": {"num_cpus": 0.2, "kv_cache_gib": 0.02}, "ingress": {"num_cpus": 0.1}})
    prefill = serve.deployment(handoff_fakes.SlowPrefillServer).options(
        name="PrefillServer", **{**_options(config.prefill, config),
                                 **_routing(config, config.prefill, "PrefillServer", PREFILL)},
    ).bind(config, 2.0, 0.0)
    decode = DecodeServer.options(**{**_options(config.decode, config),
                                     **_routing(config, config.decode, "DecodeServer", DECODE)},
                                  ).bind(config, {DEFAULT_POOL: prefill})
    serve.run(OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode),
              name="autoscale", route_prefix="/autoscale")
    try:
        def num_prefill_replicas() -> int:
            app = serve.status().applications["autoscale"]
            return sum(app.deployments["PrefillServer"].replica_states.values())

        assert num_prefill_replicas() == 1
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(complete, serve_app + "/autoscale", LONG, i)
                       for i in range(6)]
            end = time.monotonic() + 180
            while num_prefill_replicas() < 2:
                assert time.monotonic() < end, serve.status().applications["autoscale"]
                time.sleep(1.0)
            assert all(f.result().status_code in (200, 429) for f in futures)
    finally:
        serve.delete("autoscale")
        ray.cloudpickle.unregister_pickle_by_value(handoff_fakes)
