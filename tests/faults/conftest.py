"""One Serve app for the CI fault tests (an app start costs ~30 s on 2 cores): the real app on
``random:tiny-llama`` (every prompt of 8+ tokens disaggregated), its DecodeServer the test
fake ``StalledPullDecodeServer`` (fault_fakes.py: pulls of one prompt length stall, all others
are the real thing), with a short pull deadline so that a stalled pull fails within seconds,
and a short fence grace for cancelled prefills (``CANCEL_GRACE_S``): its KV moves only through
the object store, so a cancelled prefill never writes into decode's rows and the grace only
bounds the wait for a late completion record (milliseconds here); the 10 s default made every
test that cancels wait ~15 s (grace + the fence margin) for its blocks.

It runs on the Ray instance already up (``make test``: the deployments tests keep theirs for
the session), under ``/faults-ci``, reserving little CPU next to the app there; or on one of
its own. The slow fault tests (test_kill_replicas.py) start their own Ray instance.
``DISAGG_FAULTS_CI_JSON`` names a file for the numbers the tests record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faultlib import CANCEL_GRACE_S, MODEL, PULL_DEADLINE_S, RESULTS
from helpers import free_port

APP = "faults-ci"


@pytest.fixture(scope="session")
def fault_app():
    import fault_fakes
    import ray
    import ray.cloudpickle
    from ray import serve

    import deployments.app
    from deployments.app import build_app
    from deployments.config import AppConfig
    from deployments.decode_server import DecodeServer

    own = not ray.is_initialized()
    if own:
        port = free_port()
        ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
                 log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    ray.cloudpickle.register_pickle_by_value(fault_fakes)  # replicas cannot import tests/
    config = AppConfig.model_validate({
        "model": MODEL, "local_prefill_max_tokens": 8, "health_check_period_s": 1.0,
        "prefill": {"num_cpus": 0.2}, "ingress": {"num_cpus": 0.1},
        "decode": {"num_cpus": 0.2, "kv_cache_gib": 0.1,  # ~100K tokens: ample here
                   "remote_kv_timeout_s": PULL_DEADLINE_S,
                   "cancel_grace_s": CANCEL_GRACE_S}})
    mp = pytest.MonkeyPatch()
    mp.setattr(deployments.app, "DecodeServer",
               DecodeServer.options(func_or_class=fault_fakes.StalledPullDecodeServer))
    try:
        serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    finally:
        mp.undo()
    try:
        yield f"http://127.0.0.1:{port}/{APP}", APP
    finally:
        serve.delete(APP)
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
