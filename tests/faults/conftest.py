"""The CI fault tests' Serve apps (an app start costs ~30 s on 2 cores), both the real app on
``random:tiny-llama`` (every prompt of 8+ tokens disaggregated) with a short fence grace for
cancelled prefills (``CANCEL_GRACE_S``): its KV moves only through the object store, so a
cancelled prefill never writes into decode's rows and the grace only bounds the wait for a late
completion record (milliseconds here); the 10 s default made every test that cancels wait ~15 s
(grace + the fence margin) for its blocks.

- ``fault_app`` (session, ``/faults-ci``): its DecodeServer the test fake
  ``StalledPullDecodeServer`` (fault_fakes.py: pulls of one prompt length stall, all others are
  the real thing), with a short hand-off deadline (``PULL_DEADLINE_S``) so that a stalled pull
  fails within seconds.
- ``soak_app`` (test_soak.py, ``/soak-ci``): the real DecodeServer with the shipped deadlines.
  The fault app's deadline covers a request from block reservation to usable KV, prefill's
  queue included: a soak on it failed in CI once token 0 came later than that (cause unknown).

They run on the Ray instance already up (``make test``: the deployments tests keep theirs for
the session), reserving little CPU next to the app there; or on one of their own. The slow
fault tests (test_kill_replicas.py) start their own Ray instance. ``DISAGG_FAULTS_CI_JSON``
names a file for the numbers the tests record.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from faultlib import CANCEL_GRACE_S, MODEL, PULL_DEADLINE_S, RESULTS
from helpers import free_port

APP = "faults-ci"
SOAK_APP = "soak-ci"


def deploy(app: str, decode: dict, decode_server=None) -> str:
    """Deploy the real app on ``random:tiny-llama`` as ``app`` (under ``/app``), reserving
    little CPU, with ``decode`` settings over the defaults and, if given, ``decode_server``
    (a DecodeServer subclass) in place of the DecodeServer. Returns its URL."""
    import ray.cloudpickle
    from ray import serve
    from ray.serve.context import _get_global_client

    import deployments.app
    from deployments.app import build_app
    from deployments.config import AppConfig
    from deployments.decode_server import DecodeServer

    config = AppConfig.model_validate({
        "model": MODEL, "local_prefill_max_tokens": 8, "health_check_period_s": 1.0,
        "prefill": {"num_cpus": 0.1}, "ingress": {"num_cpus": 0.05},
        "decode": {"num_cpus": 0.1, "kv_cache_gib": 0.1, **decode}})  # ~100K tokens: ample
    mp = pytest.MonkeyPatch()
    if decode_server is not None:
        ray.cloudpickle.register_pickle_by_value(sys.modules[decode_server.__module__])
        mp.setattr(deployments.app, "DecodeServer",
                   DecodeServer.options(func_or_class=decode_server))
    try:
        serve.run(build_app(config), name=app, route_prefix=f"/{app}")
    finally:
        mp.undo()
    return f"http://127.0.0.1:{_get_global_client().http_config.port}/{app}"


@pytest.fixture(scope="session")
def ray_instance():
    """The Ray instance and Serve already up (``make test``), or one of this session's own."""
    import ray
    from ray import serve

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield
    finally:
        if own:
            serve.shutdown()
            ray.shutdown()
        path = os.environ.get("DISAGG_FAULTS_CI_JSON")
        if path and RESULTS:
            from benchmarks.common import write_results

            write_results("faults_ci_cpu", [{"test": k, **v} for k, v in RESULTS.items()],
                          out=Path(path), extra={"model": MODEL,
                                                 "pull_deadline_s": PULL_DEADLINE_S,
                                                 "cancel_grace_s": CANCEL_GRACE_S})


@pytest.fixture(scope="session")
def fault_app(ray_instance):
    import fault_fakes
    from ray import serve

    url = deploy(APP, {"remote_kv_timeout_s": PULL_DEADLINE_S, "cancel_grace_s": CANCEL_GRACE_S},
                 fault_fakes.StalledPullDecodeServer)
    try:
        yield url, APP
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def soak_app(ray_instance):
    """The real app with the shipped deadlines (the fault app's pull deadline would bound how
    long a prompt may queue for prefill too: a timing bound, not a fault) and the fault app's
    short fence grace."""
    from ray import serve

    url = deploy(SOAK_APP, {"cancel_grace_s": CANCEL_GRACE_S})
    try:
        yield url, SOAK_APP
    finally:
        serve.delete(SOAK_APP)
