"""Cut KubeRay's RayService CRD down to the fields our manifest uses (run by hand, no network).

    python cluster/kuberay/trim_crd.py ray.io_rayservices.yaml > cluster/kuberay/rayservice-crd-v1.7.0.json

The input is the CRD of the KubeRay release named below, from
https://github.com/ray-project/kuberay/blob/v1.7.0/ray-operator/config/crd/bases/ray.io_rayservices.yaml
(~1 MB: every Pod field, twice). The output keeps the ``v1`` OpenAPI schema in full along every
path ``rayservice.yaml`` sets, and of every other property only its name and type, marked
``x-disagg-trimmed``: validation still rejects an unknown or mistyped field at every level the
manifest touches, and a field added later under a trimmed property fails until this script is
run again (``tests/cluster/test_manifests.py`` says so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KUBERAY_VERSION = "v1.7.0"
KUBERAY_COMMIT = "59d663aeec13760646da3db9c1cf8cfe883e30b7"
SOURCE = (f"https://github.com/ray-project/kuberay/blob/{KUBERAY_VERSION}/ray-operator/config/"
          "crd/bases/ray.io_rayservices.yaml")
MANIFEST = Path(__file__).with_name("rayservice.yaml")
_KEPT = ("type", "format", "enum", "required", "pattern", "minimum", "maximum", "anyOf",
         "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def _merge(values: list) -> object:
    """One instance standing for all ``values`` (the elements of a list, the values of a map):
    dicts merged key by key, lists concatenated, else the first."""
    dicts = [v for v in values if isinstance(v, dict)]
    if dicts:
        return {k: _merge([d[k] for d in dicts if k in d]) for d in dicts for k in d}
    lists = [v for v in values if isinstance(v, list)]
    if lists:
        return [x for v in lists for x in v]
    return values[0] if values else None


def trim(schema: dict, instance: object) -> dict:
    """``schema`` in full where ``instance`` has values, names and types elsewhere."""
    out = {k: schema[k] for k in _KEPT if k in schema}
    if instance is None:
        if "properties" in schema or "items" in schema or "additionalProperties" in schema:
            out["x-disagg-trimmed"] = True
        return out
    if "properties" in schema:
        given = instance if isinstance(instance, dict) else {}
        out["properties"] = {name: trim(sub, given.get(name))
                             for name, sub in schema["properties"].items()}
    if "items" in schema:
        items = instance if isinstance(instance, list) else []
        out["items"] = trim(schema["items"], _merge(items) if items else None)
    if isinstance(schema.get("additionalProperties"), dict):
        values = list(instance.values()) if isinstance(instance, dict) else []
        out["additionalProperties"] = trim(schema["additionalProperties"],
                                           _merge(values) if values else None)
    return out


def main(argv: list[str]) -> int:
    crd = yaml.safe_load(Path(argv[1]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    manifest = yaml.safe_load(MANIFEST.read_text())
    out = {"source": SOURCE, "kuberay_version": KUBERAY_VERSION, "commit": KUBERAY_COMMIT,
           "crd": crd["metadata"]["name"], "api_version": f"{crd['spec']['group']}/v1",
           "trimmed_for": "cluster/kuberay/rayservice.yaml",
           "schema": trim(version["schema"]["openAPIV3Schema"], manifest)}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
