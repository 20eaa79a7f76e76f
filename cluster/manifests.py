"""The cluster manifests, checked without a cluster or a network.

- ``launcher_errors``: ``cluster/launcher/cluster.yaml`` against the JSON schema inside the
  installed Ray wheel (``ray/autoscaler/ray-schema.json``), then Ray's own checks after it
  filled in its provider defaults, as ``ray up`` does before it starts anything.
- ``rayservice_errors``: ``cluster/kuberay/rayservice.yaml`` against the RayService CRD of the
  KubeRay version we target (``rayservice-crd-v1.7.0.json``, trimmed by ``trim_crd.py``), with
  unknown fields rejected as ``kubectl apply --validate=strict`` rejects them.
- ``serve_config_drift``: the Serve config each manifest deploys, parsed as ``make serve``
  parses its own (``deployments.launch.load_config`` then ``AppConfig``), must equal
  ``deployments/prefill_decode.yaml`` except in ``CLUSTER_FIELDS``, where things run.
- ``node_type_shortfalls``: every role's replica (an SP group for prefill) fits its node type.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig, PrefillSettings, ReplicaSettings
from deployments.launch import load_config

REPO = Path(__file__).resolve().parents[1]
MAKE_SERVE_CONFIG = REPO / "deployments" / "prefill_decode.yaml"  # what `make serve` runs
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
RAYSERVICE_CRD = REPO / "cluster" / "kuberay" / "rayservice-crd-v1.7.0.json"
LAUNCHER = REPO / "cluster" / "launcher" / "cluster.yaml"
LOCAL_SERVE_CONFIG = REPO / "cluster" / "local" / "serve.yaml"
LAUNCHER_MOUNT = "/home/ray/disagg-launcher"
APP = "disagg"
ROLES = ("prefill", "decode", "ingress")

# Where things run: the only app-config fields a cluster manifest may set differently.
CLUSTER_FIELDS = frozenset(
    {"kv_transports", "gpu_peer_access", "cache_dir", "prefill_pools", "decode.kv_cache_gib",
     "decode.max_num_seqs", "prefill.sp", "prefill.whole_node"}
    | {f"{role}.{name}" for role in ROLES
       for name in ("num_replicas", "autoscaling", "num_cpus", "num_gpus", "resources")})


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- the Serve config inside each manifest -------------------------------------------------

def serve_config_text(text: str) -> ServeDeploySchema:
    """A Serve config file's text, checked exactly as ``make serve`` checks its file."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(Path(f.name))


def rayservice_serve_config(path: Path = RAYSERVICE) -> ServeDeploySchema:
    return serve_config_text(_read_yaml(path)["spec"]["serveConfigV2"])


def launcher_serve_config(path: Path = LAUNCHER) -> ServeDeploySchema:
    """The ``serve.yaml`` in the folder the launcher mounts at ``LAUNCHER_MOUNT`` on the head
    (the file its header's ``serve deploy`` names)."""
    local = _read_yaml(path)["file_mounts"][LAUNCHER_MOUNT]
    return serve_config_text((REPO / local / "serve.yaml").read_text())


def app_config(config: ServeDeploySchema, name: str = APP) -> AppConfig:
    (app,) = [a for a in config.applications if a.name == name]
    return AppConfig.model_validate(app.args or {})


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("resources",):
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def serve_config_drift(config: ServeDeploySchema,
                       reference: ServeDeploySchema) -> list[str]:
    """How ``config`` differs from ``reference`` outside where things run (empty: no drift)."""
    ours = {a.name: a for a in config.applications}
    theirs = {a.name: a for a in reference.applications}
    if set(ours) != set(theirs):
        return [f"applications {sorted(ours)} != {sorted(theirs)}"]
    problems = []
    for name, app in ours.items():
        for field in ("import_path", "route_prefix"):
            if getattr(app, field) != getattr(theirs[name], field):
                problems.append(f"{name}.{field}: {getattr(app, field)!r} != "
                                f"{getattr(theirs[name], field)!r}")
    a = _flat(app_config(config).model_dump(mode="json"))
    b = _flat(app_config(reference).model_dump(mode="json"))
    for path in sorted(set(a) | set(b)):
        if path not in CLUSTER_FIELDS and a.get(path) != b.get(path):
            problems.append(f"args.{path}: {a.get(path)!r} != {b.get(path)!r}")
    return problems


# -- node types -----------------------------------------------------------------------------

def replica_demand(settings: ReplicaSettings) -> dict[str, float]:
    """What one replica (for prefill: its whole SP group) takes from one node."""
    ranks = settings.sp if isinstance(settings, PrefillSettings) else 1
    demand = {"CPU": settings.num_cpus * ranks, "GPU": settings.num_gpus * ranks}
    demand.update(settings.resources)
    return demand


def node_type_shortfalls(config: AppConfig, node_types: dict[str, dict[str, float]]
                         ) -> list[str]:
    """Roles whose replica fits no node type (``node_types``: name -> Ray resources)."""
    problems = []
    for role in ROLES:
        demand = replica_demand(getattr(config, role))
        if not any(all(resources.get(k, 0) >= v for k, v in demand.items() if v > 0)
                   for resources in node_types.values()):
            problems.append(f"{role} needs {demand} on one node; node types: {node_types}")
    return problems


def launcher_node_types(path: Path = LAUNCHER) -> dict[str, dict[str, float]]:
    types = _read_yaml(path)["available_node_types"]
    return {name: dict(t["resources"]) for name, t in types.items()}


def _k8s_quantity(q: str | int) -> float:
    q = str(q)
    if q.endswith("m"):
        return int(q[:-1]) / 1000
    return float(q)


def rayservice_node_types(path: Path = RAYSERVICE) -> dict[str, dict[str, float]]:
    """Each group's Ray resources: CPUs and GPUs of its container limits (as KubeRay's
    ``ray start`` gets them), its ``num-gpus``, and its custom ``resources``."""
    cluster = _read_yaml(path)["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    out = {}
    for name, group in groups.items():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": _k8s_quantity(limits.get("cpu", 0)),
                     "GPU": _k8s_quantity(limits.get("nvidia.com/gpu", 0))}
        if "num-gpus" in group.get("rayStartParams", {}):
            resources["GPU"] = float(group["rayStartParams"]["num-gpus"])
        resources.update({k: _k8s_quantity(v) for k, v in group.get("resources", {}).items()})
        out[name] = resources
    return out


# -- schemas --------------------------------------------------------------------------------

def ray_schema_path() -> Path:
    return Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def launcher_errors(path: Path = LAUNCHER) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _read_yaml(path)
    schema = json.loads(ray_schema_path().read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except (ValueError, RuntimeError, jsonschema.ValidationError) as e:
            errors.append(f"ray up's checks: {e}")
    return errors


def _strict(schema: dict) -> dict:
    """The CRD's OpenAPI schema as JSON Schema that refuses unknown fields (kubectl's strict
    validation; the API server would drop them silently)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = _strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    elif schema.get("x-disagg-trimmed"):  # trim_crd.py kept no field under it: re-run it
        if schema.get("type") == "array":
            out["maxItems"] = 0
        else:
            out["additionalProperties"] = False
    elif "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def rayservice_crd() -> dict:
    return json.loads(RAYSERVICE_CRD.read_text())


def rayservice_errors(path: Path = RAYSERVICE) -> list[str]:
    crd = rayservice_crd()
    manifest = _read_yaml(path)
    errors = []
    if manifest.get("apiVersion") != crd["api_version"] or manifest.get("kind") != "RayService":
        errors.append(f"not a {crd['api_version']} RayService")
    validator = jsonschema.Draft7Validator(_strict(crd["schema"]))
    errors += [f"{'/'.join(map(str, e.path))}: {e.message}"
               for e in validator.iter_errors(manifest)]
    if errors:
        errors.append(f"(the schema is {RAYSERVICE_CRD.name}, trimmed to the fields "
                      "rayservice.yaml used; for a real CRD field new to the manifest, re-run "
                      "cluster/kuberay/trim_crd.py)")
    return errors
