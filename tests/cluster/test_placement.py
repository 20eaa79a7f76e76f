"""Placement rules of the app config: custom resources per role, the SP group's placement group,
and the Serve options ``build_app`` gives each deployment (Serve itself checks them here)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig, DecodeSettings, PrefillSettings
from deployments.decode_server import DecodeServer
from deployments.placement import actor_resources, prefill_placement, sp_group_bundles
from deployments.prefill_server import PrefillServer


def test_a_role_requires_the_custom_resources_of_its_node_type():
    decode = DecodeSettings(num_cpus=8, num_gpus=1, resources={"decode": 1})
    assert actor_resources(decode) == {"num_cpus": 8, "num_gpus": 1,
                                       "resources": {"decode": 1.0}}
    assert actor_resources(DecodeSettings()) == {"num_cpus": 0.5, "num_gpus": 0}
    replica = DecodeServer.options(ray_actor_options=actor_resources(decode))._replica_config
    assert replica.resource_dict == {"CPU": 8, "GPU": 1, "decode": 1.0}


@pytest.mark.parametrize("resources", [{"GPU": 1}, {"CPU": 2}, {"memory": 1e9}, {"decode": 0},
                                       {"decode": -1}])
def test_builtin_or_non_positive_resources_are_refused(resources):
    with pytest.raises(ValidationError, match="custom resource"):
        DecodeSettings(resources=resources)


def test_a_single_rank_prefill_replica_needs_no_placement_group():
    assert sp_group_bundles(PrefillSettings(resources={"prefill": 1})) is None
    assert prefill_placement(PrefillSettings()) == {}


def test_an_sp_group_is_strict_packed_one_bundle_per_rank_the_replica_first():
    settings = PrefillSettings(num_cpus=8, num_gpus=1, sp=4, resources={"prefill_node": 1})
    options = prefill_placement(settings)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [
        {"CPU": 8, "GPU": 1, "prefill_node": 1}] + [{"CPU": 8, "GPU": 1}] * 3
    # Serve refuses a first bundle that does not hold the replica actor: this one does.
    replica = PrefillServer.options(ray_actor_options=actor_resources(settings),
                                    **options)._replica_config
    assert replica.placement_group_bundles == options["placement_group_bundles"]


def test_cpu_sp_ranks_reserve_no_gpu():
    bundles = sp_group_bundles(PrefillSettings(num_cpus=0.5, sp=3))
    assert bundles == [{"CPU": 0.5}] * 3


def test_whole_node_gives_even_one_rank_its_own_group_on_the_marked_node():
    settings = PrefillSettings(num_cpus=0.5, whole_node=True, resources={"prefill": 1})
    assert prefill_placement(settings) == {
        "placement_group_bundles": [{"CPU": 0.5, "prefill": 1}],
        "placement_group_strategy": "STRICT_PACK"}


def test_whole_node_without_a_node_marker_is_refused():
    with pytest.raises(ValidationError, match="whole_node needs `resources`"):
        PrefillSettings(sp=8, num_gpus=1, whole_node=True)


def test_the_app_config_reads_placement_from_yaml_args():
    config = AppConfig.model_validate({
        "prefill": {"sp": 2, "whole_node": True, "resources": {"prefill_node": 1}},
        "decode": {"resources": {"decode": 1}}})
    assert config.prefill.resources == {"prefill_node": 1.0}
    assert len(sp_group_bundles(config.prefill)) == 2
    assert config.ingress.resources == {}


def test_build_app_places_each_deployment_as_its_role_asks():
    from deployments.app import build_app

    app = build_app(AppConfig(
        model="random:tiny-llama",
        prefill={"sp": 2, "whole_node": True, "resources": {"prefill": 1}},
        decode={"resources": {"decode": 1}}))
    ingress = app._bound_deployment  # the graph: ingress -> decode -> prefill
    decode = ingress.init_args[1]._bound_deployment
    prefill = decode.init_args[1]._bound_deployment
    assert (decode.name, prefill.name) == ("DecodeServer", "PrefillServer")
    assert decode.ray_actor_options["resources"] == {"decode": 1.0}
    assert decode._replica_config.placement_group_bundles is None
    assert prefill.ray_actor_options["resources"] == {"prefill": 1.0}
    assert prefill._replica_config.placement_group_bundles == [{"CPU": 0.5, "prefill": 1.0},
                                                               {"CPU": 0.5}]
    assert prefill._replica_config.placement_group_strategy == "STRICT_PACK"
    assert "resources" not in ingress.ray_actor_options
