"""The cluster manifests, validated without a cluster or a network: the launcher YAML against
the schema inside the Ray wheel, the RayService against the KubeRay v1.7.0 CRD, and the Serve
config each deploys against the app ``make serve`` runs. Each check is also shown failing on a
broken copy, so a pass means something."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml

from cluster import manifests as m
from deployments.launch import load_config


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def make_serve():
    return load_config(m.MAKE_SERVE_CONFIG)


def test_the_launcher_yaml_passes_the_ray_wheels_schema_and_ray_ups_checks():
    assert m.ray_schema_path().is_file()
    assert m.launcher_errors() == []


def test_a_broken_launcher_yaml_is_refused(tmp_path):
    doc = yaml.safe_load(m.LAUNCHER.read_text())
    typo = copy.deepcopy(doc)
    typo["available_node_types"]["decode"]["min_worker"] = 2  # not min_workers
    assert any("min_worker" in e for e in m.launcher_errors(_write(tmp_path, "a.yaml", typo)))
    fraction = copy.deepcopy(doc)
    fraction["available_node_types"]["prefill"]["resources"]["prefill_node"] = 0.5
    assert any("prefill_node" in e for e in m.launcher_errors(_write(tmp_path, "b.yaml",
                                                                      fraction)))
    head = copy.deepcopy(doc)
    head["head_node_type"] = "no-such-type"  # passes the schema, fails ray up's own checks
    assert any("head_node_type" in e for e in m.launcher_errors(_write(tmp_path, "c.yaml",
                                                                        head)))


def test_the_rayservice_passes_the_kuberay_crd_it_names():
    crd = m.rayservice_crd()
    assert crd["kuberay_version"] == "v1.7.0"
    assert crd["source"].startswith("https://github.com/ray-project/kuberay/blob/v1.7.0/")
    assert "KubeRay v1.7.0" in m.RAYSERVICE.read_text().splitlines()[0]
    manifest = yaml.safe_load(m.RAYSERVICE.read_text())
    # The Ray in the image is the Ray whose launcher schema and Serve schema we check against.
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert m.rayservice_errors() == []


def test_a_broken_rayservice_is_refused(tmp_path):
    doc = yaml.safe_load(m.RAYSERVICE.read_text())
    unknown = copy.deepcopy(doc)
    unknown["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["gpusPerPod"] = 8
    assert any("gpusPerPod" in e for e in m.rayservice_errors(_write(tmp_path, "a.yaml",
                                                                      unknown)))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["replicas"] = "2"
    assert any("'2' is not of type 'integer'" in e
               for e in m.rayservice_errors(_write(tmp_path, "b.yaml", wrong_type)))
    missing = copy.deepcopy(doc)
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e
               for e in m.rayservice_errors(_write(tmp_path, "c.yaml", missing)))
    deep = copy.deepcopy(doc)  # inside the Pod template, a level the manifest uses
    deep["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in m.rayservice_errors(_write(tmp_path, "d.yaml",
                                                                            deep)))


@pytest.mark.parametrize("name", ["rayservice", "launcher", "local"])
def test_each_cluster_deploys_the_app_make_serve_runs(name, make_serve):
    config = {"rayservice": m.rayservice_serve_config, "launcher": m.launcher_serve_config,
              "local": lambda: load_config(m.LOCAL_SERVE_CONFIG)}[name]()
    drift = m.serve_config_drift(config, make_serve)
    assert drift == [], (f"the {name} Serve config differs from {m.MAKE_SERVE_CONFIG.name} "
                         f"outside placement: {drift}; change both together")


def test_drift_outside_placement_is_caught(make_serve):
    text = yaml.safe_load(m.RAYSERVICE.read_text())["spec"]["serveConfigV2"]
    drifted = m.serve_config_text(text.replace("max_queue_wait_s: 30", "max_queue_wait_s: 5"))
    assert m.serve_config_drift(drifted, make_serve) == [
        "args.routing.max_queue_wait_s: 5.0 != 30.0"]
    renamed = m.serve_config_text(text.replace("deployments.app:app_builder",
                                               "deployments.app:build_app"))
    assert any("import_path" in d for d in m.serve_config_drift(renamed, make_serve))


def test_the_two_gpu_clusters_deploy_the_same_config():
    assert m.rayservice_serve_config() == m.launcher_serve_config()


@pytest.mark.parametrize("name", ["rayservice", "launcher"])
def test_every_role_fits_a_node_type(name):
    config = m.app_config({"rayservice": m.rayservice_serve_config,
                           "launcher": m.launcher_serve_config}[name]())
    node_types = {"rayservice": m.rayservice_node_types, "launcher": m.launcher_node_types}[name]()
    assert m.node_type_shortfalls(config, node_types) == []
    # The SP group must fit one node: twice the ranks fit none.
    bigger = config.model_copy(update={"prefill": config.prefill.model_copy(
        update={"sp": 2 * config.prefill.sp})})
    assert [p.split()[0] for p in m.node_type_shortfalls(bigger, node_types)] == ["prefill"]
