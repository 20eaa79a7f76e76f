"""The YAML files in ``deployments/`` as users run them: each one's app args validate, the
HTTP proxy binds to loopback, and the serving files run two ingress replicas with a bound on
what the proxy holds (one ingress restarting would leave requests waiting in silence)."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO_ROOT

from deployments.config import AppConfig

FILES = sorted((REPO_ROOT / "deployments").glob("*.yaml"))
SERVING = ("prefill_decode.yaml", "prefill_decode_1gpu.yaml", "prefill_decode_2gpu.yaml")


def _load(path):
    return yaml.safe_load(path.read_text())


def test_every_serving_file_is_shipped():
    assert set(SERVING) <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_app_args_validate_and_the_proxy_binds_to_loopback(path):
    shipped = _load(path)
    assert shipped["http_options"]["host"] == "127.0.0.1"
    [app] = shipped["applications"]
    assert app["import_path"] == "deployments.app:app_builder"
    AppConfig(**app["args"])


@pytest.mark.parametrize("name", SERVING)
def test_serving_files_run_two_ingress_replicas_with_a_proxy_queue_bound(name):
    config = AppConfig(**_load(REPO_ROOT / "deployments" / name)["applications"][0]["args"])
    assert config.ingress.num_replicas >= 2
    assert config.ingress.max_queued_requests is not None
