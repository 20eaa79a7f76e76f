"""``python -m cluster.local start|deploy|status|stop [--state DIR]``.

    start    a head and two workers (prefill, decode node types), each with its own ports
    deploy   a Serve config (default cluster/local/serve.yaml) onto it, until RUNNING
    status   the nodes and the node each replica runs on, as JSON
    stop     delete the apps, stop every process of the cluster by its id

The state directory (default: $TMPDIR/disagg-local-cluster) holds ``state.json`` (ports,
each node's session and process ids) and the ``ray start`` logs.
Exit status: 0; 1 when ``stop`` left a process alive; 2 when ``start`` failed (it stopped what
it had started), ``deploy`` failed (the cluster stays up), or there is no cluster to talk to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from cluster.local.nodes import (
    ClusterStartError,
    ClusterState,
    cluster_processes,
    start_cluster,
    stop_cluster,
)

DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "deploy", "status", "stop"])
    parser.add_argument("--state", type=Path,
                        default=Path(tempfile.gettempdir()) / "disagg-local-cluster")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="Serve config file to deploy")
    parser.add_argument("--keep-logs", action="store_true",
                        help="stop: keep the Ray temp dir (session logs)")
    args = parser.parse_args(argv)

    if args.command == "start":
        try:
            state = start_cluster(args.state)
        except ClusterStartError as e:  # what it started is stopped already
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"gcs_address": state.gcs_address, "dashboard": state.dashboard_url,
                          "http": f"http://127.0.0.1:{state.http_port}",
                          "nodes": [n.name for n in state.nodes]}, indent=2))
        return 0
    if not (args.state / "state.json").exists():
        print(f"error: no cluster in {args.state} (start one first)", file=sys.stderr)
        return 2
    state = ClusterState.load(args.state)
    os.environ.update(state.client_env())  # this process talks to the cluster: its token
    os.environ.pop("RAY_AUTH_TOKEN", None)
    if args.command == "deploy":
        from cluster.local.serve_app import DeployError, deploy
        from deployments.launch import ConfigFileError

        try:
            deploy(state, args.config)
        except (DeployError, ConfigFileError) as e:  # the cluster stays up: `stop` ends it
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"serving on http://127.0.0.1:{state.http_port}")
    elif args.command == "status":
        from cluster.local.serve_app import placement

        print(json.dumps({
            "nodes": [{"name": n.name, "resources": n.resources, "session_id": n.session_id}
                      for n in state.nodes],
            "replicas": [dataclasses.asdict(r) for r in placement(state)],
            "num_processes": len(cluster_processes(state))}, indent=2))
    else:
        from cluster.local.serve_app import delete_apps

        try:
            delete_apps(state)
        except Exception as e:  # noqa: BLE001 (the head may be gone already: stop anyway)
            print(f"could not delete the Serve apps ({e!r}); stopping the nodes", file=sys.stderr)
        survivors = stop_cluster(state, keep_logs=args.keep_logs)
        if survivors:
            print(f"still alive: {[p.pid for p in survivors]}", file=sys.stderr)
            return 1
        print("stopped: no process of the cluster is left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
