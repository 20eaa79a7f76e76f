"""One Ray instance and one Serve app for the whole deployments test module (an app start
costs ~30 s on 2 cores)."""

from __future__ import annotations

import socket

import pytest
from helpers import embedded_model_dir

LOCAL_PREFILL_MAX_TOKENS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray's Prometheus exporter of this node listens."""
    return _free_port()


@pytest.fixture(scope="session")
def serve_app(metrics_port):
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    port = _free_port()
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = AppConfig(cache_dir=embedded_model_dir().parent,
                       local_prefill_max_tokens=LOCAL_PREFILL_MAX_TOKENS,
                       health_check_period_s=1.0)
    serve.run(build_app(config), name="disagg", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
