"""Each CPU KV backend between two real Serve replicas (random:tiny-llama): the prompt KV in
decode's pool is bit-exact -- the same bytes over ``gloo`` as over the object store, and as
the prefill engine computes in this process -- and each request leaves nothing behind. KV
whose fingerprint names another model is rejected: the request ends with an error after
token 0, and nothing is decoded from it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
import ray.cloudpickle
from ray import serve

MODEL = "random:tiny-llama"
PROMPT = list(range(30, 230))  # 200 tokens: disaggregated
BACKENDS = ["object_store", "gloo"]


def config_for(backend: str):
    from deployments.config import AppConfig

    return AppConfig.model_validate({
        "model": MODEL, "local_prefill_max_tokens": 8, "kv_transports": [backend],
        "health_check_period_s": 1.0,
        "prefill": {"num_cpus": 0.2}, "decode": {"num_cpus": 0.2, "kv_cache_gib": 0.01},
        "ingress": {"num_cpus": 0.1}})


def deploy(backend: str, prefill_class=None) -> tuple[str, str]:
    """An app of the real deployments (the prefill class replaceable) under /<app>."""
    import handoff_fakes

    from deployments.app import _options
    from deployments.ingress import OpenAIIngress
    from deployments.prefill_server import PrefillServer

    ray.cloudpickle.register_pickle_by_value(handoff_fakes)  # replicas cannot import tests/
    config = config_for(backend)
    app = f"kv-{backend}" + ("" if prefill_class is None else f"-{prefill_class.__name__}")
    prefill_deployment = PrefillServer if prefill_class is None else \
        serve.deployment(prefill_class).options(name="PrefillServer")
    prefill = prefill_deployment.options(**_options(config.prefill, config)).bind(config)
    decode = serve.deployment(handoff_fakes.KVDigestDecodeServer).options(
        name="DecodeServer", **_options(config.decode, config)).bind(config, prefill)
    ingress = OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode)
    serve.run(ingress, name=app, route_prefix=f"/{app}")
    return app, f"/{app}"


def wait_for_free_blocks(app: str):
    handle = serve.get_deployment_handle("DecodeServer", app)
    end = time.monotonic() + 30  # liveness: the request's blocks return
    while True:
        stats = handle.stats.remote().result()
        if stats.num_free_blocks == stats.num_total_blocks and not stats.has_unfinished:
            return stats
        assert time.monotonic() < end, stats
        time.sleep(0.1)


BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "logprobs": 1}


def served(url: str, backend: str) -> tuple[str, dict, list, object]:
    """Digest of the KV in decode's pool, the usage timing and the logprobs of one request, and
    the prefill replica's stats when the app was ready, before it."""
    app, route = deploy(backend)
    try:
        ready = serve.get_deployment_handle("PrefillServer", app).stats.remote().result()
        r = httpx.post(f"{url}{route}/v1/completions", json=BODY, timeout=120)
        r.raise_for_status()
        assert r.headers["x-disagg-path"] == "disaggregated"
        digest = serve.get_deployment_handle("DecodeServer", app).digest.remote().result()
        wait_for_free_blocks(app)
        result = r.json()
        return digest, result["usage"]["disagg_timing"], result["choices"][0]["logprobs"], ready
    finally:
        serve.delete(app)


def local_digest() -> str:
    from handoff_fakes import kv_digest

    from deployments.runtime import resolve_source
    from disagg.models.loader import load_model
    from disagg.prefill.engine import PrefillEngine
    from disagg.request import EngineRequest
    from disagg.sampling import SamplingParams

    config = config_for("object_store")
    engine = PrefillEngine(load_model(resolve_source(config)), model_name=config.model_name)
    request = EngineRequest("r", PROMPT, SamplingParams(temperature=0.0), 8, 0)
    return kv_digest(engine.prefill(request).kv)


@pytest.fixture(scope="module")
def results(serve_app):
    return {backend: served(serve_app, backend) for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_in_decode_pool_is_bit_exact(results, backend):
    digest, timing, _, _ = results[backend]
    assert timing["kv_backend"] == backend
    assert timing["kv_bytes"] == len(PROMPT) * 1024  # K+V x 4 layers x 2 heads x 16 x fp32
    assert digest is not None and digest == local_digest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_disaggregated_path_is_warmed_before_ready(results, backend):
    """The decode replica sent one start-up request through prefill and its KV backend before
    it reported ready (the first long request pays no first-use cost), and the prefill replica
    kept it out of its served count."""
    ready = results[backend][3]
    assert ready.num_warmups == 1
    assert ready.num_prefills == 0
    assert ready.num_leases == 0  # the warm-up's KV was taken and released


def test_backends_decode_the_same_tokens(results):
    logprobs = [results[b][2] for b in BACKENDS]
    assert all(lp == logprobs[0] for lp in logprobs)


def test_kv_of_another_model_is_rejected_and_never_decoded(serve_app):
    from handoff_fakes import OtherModelPrefillServer

    app, route = deploy("object_store", OtherModelPrefillServer)
    try:
        before = wait_for_free_blocks(app)
        with httpx.stream("POST", f"{serve_app}{route}/v1/completions", timeout=120,
                          json={**BODY, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        assert len([e for e in events if e.get("choices")]) == 1  # token 0 only
        error = events[-1]["error"]
        assert "model" in error["message"] and "some-other-model" in error["message"]
        assert wait_for_free_blocks(app).num_forwards == before.num_forwards  # none decoded
    finally:
        serve.delete(app)
