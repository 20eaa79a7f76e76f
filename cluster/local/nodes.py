"""A local multi-node Ray cluster on one machine: a head and two workers, each its own raylet.

Life of the cluster (``python -m cluster.local start|deploy|status|stop``):
1. ``start_cluster``: every node gets its own ports, picked free at start (GCS, dashboard,
   client server, node manager, object manager, metrics, agents, a worker port range) -- other
   Ray instances on the machine keep theirs, the defaults (6379, 8265, 10001, ...) are never
   taken -- its own CPUs, custom resources (``prefill`` on one worker, ``decode`` on the
   other) and an object store capped for a small machine. Each ``ray start`` runs as the
   leader of a new session; the state file records each node's session id and the processes
   found in it, written after every node so that ``stop`` finds a half-started cluster too.
   Ray's token authentication is on, with a token of this cluster's own (in the state
   directory): the GCS listens on the machine's address, and other users' Ray instances on
   the machine must not be able to join or drive it (nor share ``~/.ray/auth_token``).
2. ``deploy`` (``serve_app.py``): the Serve config goes to the head's dashboard, as
   ``serve deploy`` and KubeRay send it; Serve builds the app on the cluster and Ray places
   each replica on a node advertising its role's resources.
3. ``stop_cluster``: the Serve apps are deleted (replicas drain), then the workers' and the
   head's processes are stopped by their ids (``processes.py``); nothing else is touched.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.local.processes import ProcessId, session_members, stop_processes

OBJECT_STORE_BYTES = 96 << 20  # per node: the KV of the test prompts is a few MiB
_WORKER_PORTS = 40  # worker port range per node (each worker process takes one)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)


# The layout of cluster/local/serve.yaml: ingress on the head, prefill and decode each on a
# worker of their own node type (the custom resources their replicas require).
LOCAL_NODES = (
    NodeSpec("head", 1),
    NodeSpec("prefill", 1, {"prefill": 1}),
    NodeSpec("decode", 1, {"decode": 1}),
)


@dataclass
class NodeState:
    name: str
    resources: dict[str, float]
    session_id: int
    processes: list[list[int]]  # ProcessId.to_list() of each process at start


@dataclass
class ClusterState:
    """What ``start`` wrote and ``deploy``/``status``/``stop`` read (``state.json``)."""

    state_dir: str
    ray_temp_dir: str
    gcs_address: str
    dashboard_url: str
    http_port: int
    nodes: list[NodeState] = field(default_factory=list)

    @property
    def auth_token_path(self) -> Path:
        return Path(self.state_dir) / "auth_token"

    def client_env(self) -> dict[str, str]:
        """The environment a process needs to talk to this cluster (nodes, CLI, drivers)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.auth_token_path),
                "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / "state.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        raw = json.loads((Path(state_dir) / "state.json").read_text())
        raw["nodes"] = [NodeState(**n) for n in raw["nodes"]]
        return cls(**raw)

    def session_ids(self) -> list[int]:
        return [n.session_id for n in self.nodes]


class ClusterStartError(RuntimeError):
    """A node did not start; the nodes already started were stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ports:
    """Free ports for one cluster, none handed out twice (nodes start while others bind)."""

    def __init__(self):
        self._taken: set[int] = set()

    def take(self) -> int:
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    def take_range(self, n: int) -> int:
        """The first of ``n`` consecutive ports free now, between 20000 and 30000 (above
        Ray's default worker range, below the kernel's usual ephemeral range)."""
        for _ in range(200):
            base = random.randrange(20000, 30000 - n)
            block = set(range(base, base + n))
            if block & self._taken:
                continue
            try:
                for port in block:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port))
            except OSError:
                continue
            self._taken |= block
            return base
        raise ClusterStartError(f"no {n} consecutive free ports between 20000 and 30000")


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _node_args(spec: NodeSpec, state: ClusterState, ports: _Ports, head: bool) -> list[str]:
    workers = ports.take_range(_WORKER_PORTS)
    args = [
        ray_executable(), "start", f"--num-cpus={spec.num_cpus}", "--num-gpus=0",
        f"--resources={json.dumps(spec.resources)}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--node-ip-address=127.0.0.1", f"--temp-dir={state.ray_temp_dir}",
        f"--node-manager-port={ports.take()}", f"--object-manager-port={ports.take()}",
        f"--metrics-export-port={ports.take()}", f"--runtime-env-agent-port={ports.take()}",
        f"--dashboard-agent-listen-port={ports.take()}",
        f"--dashboard-agent-grpc-port={ports.take()}",
        f"--min-worker-port={workers}", f"--max-worker-port={workers + _WORKER_PORTS - 1}",
        "--include-log-monitor=false", "--disable-usage-stats",
    ]
    if head:
        port = state.gcs_address.rsplit(":", 1)[1]
        dashboard_port = state.dashboard_url.rsplit(":", 1)[1]
        args += ["--head", f"--port={port}", f"--ray-client-server-port={ports.take()}",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard_port}"]
    else:
        args += [f"--address={state.gcs_address}"]
    return args


@dataclass
class _Starting:
    spec: NodeSpec
    node: NodeState
    process: subprocess.Popen
    log: Path


def _launch(spec: NodeSpec, state: ClusterState, ports: _Ports, head: bool) -> _Starting:
    log = Path(state.state_dir) / f"ray-start-{spec.name}.log"
    env = {**os.environ, **state.client_env()}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # the token file of this cluster, not the caller's
    with log.open("w") as out:
        # A new session whose id is this pid: every process of the node will carry it.
        proc = subprocess.Popen(_node_args(spec, state, ports, head), stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = NodeState(spec.name, dict(spec.resources), proc.pid, [])
    state.nodes.append(node)  # recorded before it runs: a failed start is stopped too
    state.save()
    return _Starting(spec, node, proc, log)


def _await(starting: _Starting, state: ClusterState, timeout_s: float) -> None:
    try:
        code = starting.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    node = starting.node
    node.processes = [p.to_list() for p in session_members(node.session_id)]
    state.save()
    if code != 0:
        raise ClusterStartError(f"`ray start` of node {starting.spec.name!r} "
                                f"{'timed out' if code is None else f'exited {code}'}; see "
                                f"{starting.log}:\n{starting.log.read_text()[-2000:]}")


def _start_node(spec: NodeSpec, state: ClusterState, ports: _Ports, *, head: bool,
                timeout_s: float, attempts: int = 2) -> None:
    """Start one node; a start that failed (a raylet that missed Ray's registration deadline
    on a loaded machine) is stopped by its session and tried again with fresh ports."""
    for attempt in range(attempts):
        starting = _launch(spec, state, ports, head)
        try:
            _await(starting, state, timeout_s)
            return
        except ClusterStartError:
            if attempt == attempts - 1:
                raise
            known = [ProcessId.from_list(p) for p in starting.node.processes]
            if stop_processes(known, [starting.node.session_id]):
                raise
            state.nodes.remove(starting.node)
            state.save()


def start_cluster(state_dir: Path, nodes: tuple[NodeSpec, ...] = LOCAL_NODES, *,
                  timeout_s: float = 120.0) -> ClusterState:
    """Start ``nodes`` (the first is the head); on any failure stop what started and raise."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / "state.json").exists():
        raise ClusterStartError(f"{state_dir} already holds a cluster: stop it first")
    ports = _Ports()
    # Short, fresh temp dir: Ray's socket paths under it must stay below 108 bytes.
    state = ClusterState(str(state_dir), tempfile.mkdtemp(prefix="dlc-", dir="/tmp"),
                         f"127.0.0.1:{ports.take()}", f"http://127.0.0.1:{ports.take()}",
                         ports.take())
    fd = os.open(state.auth_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    state.save()
    try:
        # One after another: a raylet must register with the GCS within 30 s (fixed in Ray),
        # and on a loaded 2-core machine two starting at once can miss it.
        for i, spec in enumerate(nodes):
            _start_node(spec, state, ports, head=(i == 0), timeout_s=timeout_s)
    except BaseException:
        stop_cluster(state)
        raise
    return state


def cluster_processes(state: ClusterState) -> list[ProcessId]:
    """Every live process of the cluster's nodes."""
    return sorted({p for s in state.session_ids() for p in session_members(s)},
                  key=lambda p: p.pid)


def stop_cluster(state: ClusterState, *, grace_s: float = 10.0,
                 keep_logs: bool = False) -> list[ProcessId]:
    """Stop the workers, then the head, by process id; returns survivors (normally none).

    The state file is removed only when nothing survived, so a second ``stop`` can retry.
    """
    survivors: list[ProcessId] = []
    for node in reversed(state.nodes):  # workers first: the head's GCS outlives them
        known = [ProcessId.from_list(p) for p in node.processes]
        survivors += stop_processes(known, [node.session_id], grace_s=grace_s)
    if not survivors:
        if not keep_logs:
            shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
        state.auth_token_path.unlink(missing_ok=True)
        state.path.unlink(missing_ok=True)
    return survivors
