"""``python -m deployments.launch``: a signal mid-stream drains the service instead of cutting it.

The launcher runs as its own process with its own Ray instance (as ``make serve`` runs it),
so these tests do not use the session's Serve app.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import _free_port
from helpers import embedded_model_dir

REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 24
API_KEY = "sk-launch-test"


def launch(config: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deployments.launch", str(config)],
                            cwd=REPO, env=env, text=True, **kwargs)


def test_bad_config_file_exits_2_with_a_message(tmp_path):
    missing = launch(tmp_path / "missing.yaml", stderr=subprocess.PIPE)
    assert missing.wait(60) == 2
    assert "missing.yaml" in missing.stderr.read()

    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"applications": [{
        "name": "disagg", "route_prefix": "/", "import_path": "deployments.app:app_builder",
        "deployments": [{"name": "DecodeServer", "num_replicas": 2}]}]}))
    refused = launch(overrides, stderr=subprocess.PIPE)
    assert refused.wait(60) == 2
    assert "'deployments' or 'runtime_env'" in refused.stderr.read()

    bad_args = tmp_path / "bad_args.yaml"  # fails while building, before Ray starts
    bad_args.write_text(yaml.safe_dump({"applications": [{
        "name": "disagg", "route_prefix": "/", "import_path": "deployments.app:app_builder",
        "args": {"model": "no-such-model"}}]}))
    unknown = launch(bad_args, stderr=subprocess.PIPE)
    assert unknown.wait(60) == 2
    assert "no-such-model" in unknown.stderr.read()


def _config(path: Path, port: int) -> Path:
    key_file = path.with_name("api_key")  # the key lives in a file, never in the config
    key_file.write_text(API_KEY + "\n")
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "disagg", "route_prefix": "/", "import_path": "deployments.app:app_builder",
            "args": {"cache_dir": str(embedded_model_dir().parent),
                     "local_prefill_max_tokens": 8,  # every prompt below goes through prefill
                     "health_check_period_s": 1.0,
                     "prefill": {"num_cpus": 0.5}, "decode": {"num_cpus": 0.5,
                                                              "kv_cache_gib": 0.25},
                     "ingress": {"num_cpus": 0.25, "api_key_file": str(key_file)}},
        }],
    }))
    return path


def _wait_ready(base: str, proc: subprocess.Popen, deadline_s: float = 240.0) -> None:
    end = time.monotonic() + deadline_s  # liveness deadline: the app start on 2 cores
    while time.monotonic() < end:
        assert proc.poll() is None, f"launcher exited with {proc.returncode}"
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not become ready")


def _replica_log(ray_tmp: Path, deployment: str) -> str:
    logs = sorted(ray_tmp.glob(f"ray/session_*/logs/serve/replica_disagg_{deployment}_*.log"))
    assert logs, f"no {deployment} replica log under {ray_tmp}"
    return "".join(p.read_text() for p in logs)


@contextlib.contextmanager
def _launched(tmp_path: Path):
    """The launcher on a fresh port, with a Ray instance of its own; yields (process, base URL,
    Ray temp dir, launcher log path) once the app is ready, and kills what is left after."""
    port = _free_port()
    config = _config(tmp_path / "app.yaml", port)
    # A short temp dir of its own (Ray's socket paths are length-limited): a Ray instance apart
    # from the session's, and replica logs a test can read after the launcher exits.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "launcher.log"
    with log_path.open("w") as log:
        proc = launch(config, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base, proc)
            yield proc, base, ray_tmp, log_path
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _stream(base: str, max_tokens: int, signals: dict[int, int], proc: subprocess.Popen):
    """Stream a disaggregated completion, sending ``signals[n]`` to the launcher after chunk n.
    Returns (chunks, finish_reason, whether [DONE] came); a cut stream just ends early."""
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": max_tokens,
            "temperature": 0, "prompt": "Tell me a long story about the sea. " * 4}
    chunks, finish, done = 0, None, False
    auth = {"authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=auth,
                          timeout=120) as r:
            assert r.status_code == 200
            assert r.headers["x-disagg-path"] == "disaggregated"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks += 1
                finish = json.loads(line[len("data: "):])["choices"][0]["finish_reason"] or finish
                if chunks in signals:
                    proc.send_signal(signals[chunks])
    except httpx.RemoteProtocolError:
        pass  # cut by the server
    return chunks, finish, done


def _listening_addresses(ray_tmp: Path) -> dict[str, set[str]]:
    """TCP listen addresses of every process of the Ray instance under ``ray_tmp``."""
    import psutil

    found: dict[str, set[str]] = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(ray_tmp) not in " ".join(p.info["cmdline"] or []) and not any(
                    str(ray_tmp) in f.path for f in p.open_files()):
                continue
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.setdefault(f"{p.info['name']}:{p.pid}", set()).add(c.laddr.ip)
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_stream_drains_then_stops(sig, tmp_path):
    with _launched(tmp_path) as (proc, base, ray_tmp, log_path):
        # Single-machine default: every Ray port (GCS, raylet, object manager, workers,
        # agents, metrics export) and the proxy (127.0.0.1 in this config) listen on loopback.
        # The one exception is Ray's own: each Serve replica's inter-deployment gRPC server,
        # bound to [::]:0 in ray/serve/_private/replica.py with no option (README).
        listening = _listening_addresses(ray_tmp)
        names = {name.split(":")[0] for name in listening}
        assert {"gcs_server", "raylet"} <= names, listening
        public = {name: ips - {"127.0.0.1", "::ffff:127.0.0.1"} for name, ips in
                  listening.items()}
        assert all(ips <= {"::"} and name.startswith("ray::ServeRepl")
                   for name, ips in public.items() if ips), public
        for headers in ({}, {"authorization": "Bearer wrong"}):  # the 401 of the status mapping
            denied = httpx.get(f"{base}/v1/models", headers=headers, timeout=30)
            assert denied.status_code == 401
            assert denied.json()["error"]["code"] == "invalid_api_key"
        # mid-stream (chunk 3): prefill done, KV pulled, decode running
        result = _stream(base, MAX_TOKENS, {3: sig}, proc)
        # The stream was drained, not cut: every token, the finish reason, the [DONE] line.
        assert result == (MAX_TOKENS, "length", True)
        assert proc.wait(180) == 0  # liveness deadline for drain + shutdown
        prefill_log = _replica_log(ray_tmp, "PrefillServer")
        decode_log = _replica_log(ray_tmp, "DecodeServer")
        every_log = "".join(p.read_text(errors="replace") for p in ray_tmp.rglob("*")
                            if p.is_file() and p.suffix in (".log", ".out", ".err"))
    out = log_path.read_text()
    assert "draining" in out and re.search(r"drained in [\d.]+ s", out), out[-3000:]
    assert "OpenAIIngress" in every_log and API_KEY not in out + every_log  # never logged
    # The replicas' own counters as they stopped: no lease left, every KV block free.
    assert "0 KV leases outstanding" in prefill_log
    decode = re.search(r"DecodeServer stopping: (\d+)/(\d+) KV blocks free, unfinished "
                       r"requests: (\w+)", decode_log)
    assert decode, "the decode replica did not log its stop"
    assert decode[1] == decode[2] and decode[3] == "False"


def test_second_signal_stops_without_waiting(tmp_path):
    long = 400  # tens of seconds of decoding on 2 cores: the drain would wait for all of it
    with _launched(tmp_path) as (proc, base, _, log_path):
        chunks, _, done = _stream(base, long, {3: signal.SIGTERM, 6: signal.SIGTERM}, proc)
        assert proc.wait(120) == 1  # liveness deadline; 1: the drain was cut short
    assert chunks < long and not done
    out = log_path.read_text()
    assert "second signal" in out and "drain cut short" in out, out[-3000:]
