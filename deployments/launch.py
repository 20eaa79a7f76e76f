"""Serve a Serve config file and drain it on SIGINT/SIGTERM.

    python -m deployments.launch deployments/prefill_decode.yaml [--address ADDR]

Takes the same YAML as ``serve run`` and starts the same applications. The difference is the
stop: ``serve run`` answers Ctrl-C with ``serve.shutdown()``, which kills the HTTP proxy in its
first step, so every stream still in flight is cut. This launcher drains first:

1. RUNNING: the applications serve until the first SIGINT or SIGTERM.
2. DRAINING: ``serve.delete`` on each application. Serve stops routing new requests to them
   (the proxy stays up) and each replica finishes the requests it holds before it stops, up
   to its ``graceful_shutdown_timeout_s`` (``drain_timeout_s`` of the app config). Streams end
   normally; decode pulls the KV it was promised, so prefill leases are released. New
   requests get the proxy's 404 (the route is gone); one caught between ingress and a decode
   replica that already stopped gets a 503, and one whose prefill replica already stopped is
   prefilled by decode.
3. STOPPED: once the applications are gone (or a second signal, or ``--drain-timeout-s``),
   Serve and Ray are shut down if this process started them; on a cluster it joined, only its
   own applications were removed.

A Ray instance the launcher starts itself (no ``--address``, no ``RAY_ADDRESS``) is
single-machine: every Ray port binds to 127.0.0.1 (``RAY_LOOPBACK_ENV``); only the HTTP proxy
listens where ``http_options.host`` says. Joining a cluster leaves addressing to the cluster.

Exit status: 0 after a full drain, 1 when the drain was cut short, 2 for a config file that
cannot be served (unreadable, invalid schema or ``args``, unknown import path or model).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import ray
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.serve_env import set_process_env
from disagg.errors import DisaggError

_POLL_S = 0.2
# Ray's single-machine mode (the default on macOS and Windows, a switch on Linux): with it "0",
# every port of a Ray instance -- GCS, raylet, object manager, workers, dashboard agent,
# metrics export, runtime-env agent -- listens on 127.0.0.1 instead of all interfaces.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ConfigFileError(ValueError):
    """The config file cannot be served by this launcher."""


@dataclass(frozen=True)
class DrainResult:
    drained: bool  # every application stopped on its own (no timeout, no second signal)
    seconds: float
    remaining: tuple[str, ...]  # applications still present when the wait ended


def load_config(path: Path) -> ServeDeploySchema:
    """Parse and check a Serve config file (the ``serve run`` / ``serve deploy`` schema)."""
    try:
        raw = yaml.safe_load(path.read_text())
        config = ServeDeploySchema.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise ConfigFileError(f"{path}: {e}") from e
    for app in config.applications:
        # Per-deployment overrides and runtime_env are applied by Serve's config deploy path;
        # this launcher builds applications in-process, so it refuses them rather than drop them.
        if app.deployments or app.runtime_env:
            raise ConfigFileError(
                f"{path}: application {app.name!r} sets 'deployments' or 'runtime_env'; put "
                "replica settings in 'args' (the app config) or use `serve run`")
    return config


def build_application(app: ServeApplicationSchema) -> Application:
    """Import ``module:attr``; an app builder is called with ``args``, an Application taken as is."""
    module_name, _, attr = app.import_path.partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, Application):
        if app.args:
            raise ConfigFileError(f"{app.import_path} is an Application: it takes no 'args'")
        return target
    return target(app.args or {})


def build_all(config: ServeDeploySchema) -> list[tuple[ServeApplicationSchema, Application]]:
    """Build every application here, before Ray starts: a bad import path or bad ``args`` fails
    fast, and builders that prepare a model do it once, before any replica starts."""
    return [(app, build_application(app)) for app in config.applications]


def start(config: ServeDeploySchema,
          apps: list[tuple[ServeApplicationSchema, Application]]) -> tuple[list[str], bool]:
    """Start Serve (joining a running instance if there is one) and run the applications.

    Returns the application names and whether Serve had other applications already."""
    serve.start(proxy_location=config.proxy_location,
                http_options=config.http_options.model_dump())
    names = [app.name for app, _ in apps]
    others = bool(set(serve.status().applications) - set(names))
    for app, application in apps:
        serve.run(application, blocking=False, name=app.name, route_prefix=app.route_prefix)
    return names, others


def drain(names: list[str], timeout_s: float, force: threading.Event) -> DrainResult:
    """Delete the applications and wait until Serve has stopped them (see the module doc)."""
    t0 = time.monotonic()
    for name in names:
        serve.delete(name, _blocking=False)
    remaining = tuple(names)
    while remaining and not force.is_set() and time.monotonic() - t0 < timeout_s:
        time.sleep(_POLL_S)
        live = serve.status().applications
        remaining = tuple(n for n in names if n in live)
    return DrainResult(not remaining, time.monotonic() - t0, remaining)


class _Signals:
    """First SIGINT/SIGTERM: drain. Second: stop waiting."""

    def __init__(self):
        self.stop = threading.Event()
        self.force = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.force.set()
            _say("second signal: stopping now")
        else:
            self.stop.set()


def _starts_local_ray(address: str | None) -> bool:
    """True when ``ray.init`` here starts a Ray instance of its own (no cluster to join)."""
    return address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()


def _say(message: str) -> None:
    print(f"[disagg launch] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.launch",
        description="Serve a Serve config file; drain in-flight requests on SIGINT/SIGTERM.")
    parser.add_argument("config", type=Path, help="Serve config file (as for `serve run`)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--drain-timeout-s", type=float, default=60.0,
                        help="longest wait for the applications to drain (each replica also "
                             "stops on its own after the app config's drain_timeout_s)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        apps = build_all(config)
    except (ConfigFileError, ValidationError, DisaggError, ValueError, ImportError,
            AttributeError) as e:
        _say(f"error: {e}")
        return 2

    if _starts_local_ray(args.address) and os.environ.get(RAY_LOOPBACK_ENV) != "0":
        # Ray reads its single-machine switch once, at import, in every process it starts:
        # the launcher runs itself again with it set, before Ray is imported there.
        os.environ[RAY_LOOPBACK_ENV] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "deployments.launch",
                                  *(sys.argv[1:] if argv is None else argv)])
    signals = _Signals()
    started_ray = not ray.is_initialized()
    if started_ray:
        if _starts_local_ray(args.address):
            set_process_env()  # inherited by Serve's proxy (deployments/serve_env.py)
        ray.init(address=args.address, namespace="serve")
    # Installed after ray.init, which sets a SIGTERM handler of its own on drivers.
    signals.install()
    names, shared = start(config, apps)
    _say(f"serving {', '.join(names)} on http://{config.http_options.host}:"
         f"{config.http_options.port} (Ctrl-C or SIGTERM drains, a second one stops at once)")
    while not signals.stop.wait(1.0):
        pass

    _say("draining: new requests are refused; waiting for in-flight requests")
    result = drain(names, args.drain_timeout_s, signals.force)
    if result.drained:
        _say(f"drained in {result.seconds:.1f} s")
    else:
        _say(f"drain cut short after {result.seconds:.1f} s; still running: "
             f"{', '.join(result.remaining)}")
    if not shared:  # Serve serves only what this process started
        serve.shutdown()
    if started_ray:
        ray.shutdown()
    _say("stopped")
    return 0 if result.drained else 1


if __name__ == "__main__":
    sys.exit(main())
