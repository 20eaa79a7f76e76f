"""On one GPU: the cuda_ipc backend between two real Serve replicas sharing the GPU writes the
prompt KV bit-exactly -- the same bytes in decode's pool as the object-store backend delivers,
and as the prefill engine computes in this process (random SmolLM2-135M weights, bf16,
TriangleMix prefill, so the Triton Triangle kernel runs)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch

pytestmark = pytest.mark.gpu

MODEL = "random:smollm2-135m"
PROMPT = list(range(100, 2100))  # 2000 tokens: Triangle layers active


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_gpu():
    import os

    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def config_for(backend: str):
    from deployments.config import AppConfig

    return AppConfig.model_validate({
        "model": MODEL, "local_prefill_max_tokens": 64, "kv_transports": [backend],
        "trianglemix": {"enabled": True},
        "prefill": {"num_cpus": 1, "num_gpus": 0.25},
        "decode": {"num_cpus": 1, "num_gpus": 0.25, "kv_cache_gib": 1.0}})


def served_digest(url: str, backend: str) -> tuple[str, dict, list]:
    import handoff_fakes
    import ray.cloudpickle
    from ray import serve

    from deployments.app import _options
    from deployments.ingress import OpenAIIngress
    from deployments.prefill_server import PrefillServer

    ray.cloudpickle.register_pickle_by_value(handoff_fakes)
    config = config_for(backend)
    prefill = PrefillServer.options(**_options(config.prefill, config)).bind(config)
    decode = serve.deployment(handoff_fakes.KVDigestDecodeServer).options(
        name="DecodeServer", **_options(config.decode, config)).bind(config, prefill)
    ingress = OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode)
    serve.run(ingress, name=backend, route_prefix="/")
    # Ready only after the decode replica's start-up request went through this backend (for
    # cuda_ipc: the prefill replica mapped the pool before the first request).
    ready = serve.get_deployment_handle("PrefillServer", backend).stats.remote().result()
    assert (ready.num_warmups, ready.num_prefills) == (1, 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    assert r.headers["x-disagg-path"] == "disaggregated"
    result = r.json()
    digest = serve.get_deployment_handle("DecodeServer", backend).digest.remote().result()
    serve.delete(backend)
    return digest, result["usage"]["disagg_timing"], result["choices"][0]["logprobs"]


def local_digest() -> str:
    from handoff_fakes import kv_digest

    from deployments.runtime import resolve_source, trianglemix_config
    from disagg.models.loader import load_model
    from disagg.prefill.engine import PrefillEngine
    from disagg.request import EngineRequest
    from disagg.sampling import SamplingParams

    config = config_for("cuda_ipc")
    source = resolve_source(config)
    model = load_model(source, device=torch.device("cuda"), dtype=torch.bfloat16)
    engine = PrefillEngine(model, model_name=config.model_name,
                           trianglemix=trianglemix_config(config, source.model_config()))
    request = EngineRequest("r", tuple(PROMPT), SamplingParams(temperature=0.0), 8, 0)
    return kv_digest(engine.prefill(request).kv)


def test_cuda_ipc_kv_is_bit_exact_against_the_object_store_and_the_engine(serve_gpu):
    ipc, ipc_timing, ipc_logprobs = served_digest(serve_gpu, "cuda_ipc")
    store, store_timing, store_logprobs = served_digest(serve_gpu, "object_store")
    assert ipc_timing["kv_backend"] == "cuda_ipc"
    assert store_timing["kv_backend"] == "object_store"
    assert ipc_timing["kv_bytes"] == store_timing["kv_bytes"] == len(PROMPT) * 30 * 2 * 3 * 64 * 2
    assert ipc is not None and ipc == store
    assert ipc == local_digest()
    assert json.dumps(ipc_logprobs) == json.dumps(store_logprobs)
