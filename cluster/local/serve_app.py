"""Deploy a Serve config to the local cluster and read where its replicas run.

``deploy`` sends the config to the head's dashboard (Serve's REST API, what ``serve deploy``
and KubeRay use): Serve's controller builds the app on the cluster and places every replica.
``placement`` answers "which node runs each replica" twice, from Serve's state (the replica
details it reports) and from Ray's (the state API's actor and node tables), so a test can
check that both agree and that prefill and decode sit on the node types they require.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
from ray.util import state as ray_state

from cluster.local.nodes import ClusterState
from deployments.config import RAY_BUILTIN_RESOURCES
from deployments.launch import load_config

RUNNING, DEPLOY_FAILED = "RUNNING", "DEPLOY_FAILED"


class DeployError(RuntimeError):
    """The app did not reach RUNNING (failed, or the deadline passed)."""


@dataclass(frozen=True)
class ReplicaPlacement:
    deployment: str
    actor_id: str
    serve_node_id: str  # where Serve says the replica runs
    ray_node_id: str  # where Ray's actor table says its actor runs
    node_resources: dict  # the custom resources that node advertises (its node type)
    placement_group_id: str | None  # the replica's own placement group, if it has one
    bundle_resources: tuple[dict, ...] = ()  # what each bundle reserves
    bundle_node_ids: tuple[str, ...] = ()  # where Ray placed each bundle


def _client(state: ClusterState) -> ServeSubmissionClient:
    return ServeSubmissionClient(state.dashboard_url)


def deploy(state: ClusterState, config_path: Path, *, timeout_s: float = 480.0) -> None:
    """Deploy ``config_path`` (checked as ``make serve`` checks it), served on the cluster's
    own HTTP port, and wait until every application is RUNNING."""
    config = load_config(config_path)
    http = config.http_options.model_copy(update={"host": "127.0.0.1", "port": state.http_port})
    config = config.model_copy(update={"http_options": http})
    client = _client(state)
    client.deploy_applications(config.model_dump(mode="json", exclude_unset=True) |
                               {"http_options": http.model_dump(mode="json")})
    names = [app.name for app in config.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = client.get_serve_details().get("applications", {})
        statuses = {n: apps.get(n, {}).get("status") for n in names}
        if all(s == RUNNING for s in statuses.values()):
            return
        failed = {n: [apps[n].get("message", "")] + [
                      f"{d}: {info.get('message', '')}"
                      for d, info in apps[n].get("deployments", {}).items()
                      if info.get("status") != "HEALTHY"]
                  for n, s in statuses.items() if s == DEPLOY_FAILED}
        if failed:
            raise DeployError(f"deploy failed: {failed}")
        if time.monotonic() > deadline:
            raise DeployError(f"not RUNNING after {timeout_s} s: {statuses}")
        time.sleep(1.0)


def placement(state: ClusterState, app: str = "disagg") -> list[ReplicaPlacement]:
    """Every running replica of ``app`` with its node, from Serve and from Ray."""
    details = _client(state).get_serve_details()["applications"][app]
    actors = {a.actor_id: a for a in ray_state.list_actors(
        address=state.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True)}
    nodes = {n.node_id: n for n in ray_state.list_nodes(address=state.dashboard_url,
                                                       detail=True)}
    groups = {g.placement_group_id: g for g in ray_state.list_placement_groups(
        address=state.dashboard_url, detail=True)}
    out = []
    for name, deployment in details["deployments"].items():
        for replica in deployment["replicas"]:
            if replica["state"] != RUNNING:
                continue
            actor = actors[replica["actor_id"]]
            total = nodes[actor.node_id].resources_total or {}
            custom = {k: v for k, v in total.items()
                      if k not in RAY_BUILTIN_RESOURCES and not k.startswith("node:")}
            group = groups.get(actor.placement_group_id)
            bundles = group.bundles if group is not None else []
            out.append(ReplicaPlacement(
                name, replica["actor_id"], replica["node_id"], actor.node_id, custom,
                actor.placement_group_id,
                tuple(b["unit_resources"] for b in bundles),
                tuple(b.get("node_id") or "" for b in bundles)))
    return out


def delete_apps(state: ClusterState, *, timeout_s: float = 30.0) -> bool:
    """Delete every Serve application (replicas finish their requests first); True once gone."""
    client = _client(state)
    client.delete_applications()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not client.get_serve_details().get("applications"):
            return True
        time.sleep(0.5)
    return False
