"""The app's routing and autoscaling options per role are ones Serve accepts, and the
autoscaling policy scales on the replicas' load as it says. No Ray cluster is started."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from deployments.admission import prefill_deployment
from deployments.app import _options, _routing
from deployments.config import DEFAULT_POOL, AppConfig
from deployments.decode_server import DecodeServer
from deployments.ingress import OpenAIIngress
from deployments.prefill_server import PrefillServer
from deployments.router import DECODE, PREFILL, DisaggRequestRouter, LoadAutoscalingPolicy
from deployments.serve_env import (
    CUDA_MODULE_LOADING_ENV,
    CUDNN_AVOID_RECOMPILE_ENV,
    QUEUE_LENGTH_CACHE_ENV,
    QUEUE_LENGTH_CACHE_S,
)
from disagg.prefill.profiling import PROFILE_PREFILLS_ENV

ARGS = {"model": "random:tiny-llama",
        "prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}},
        "decode": {"num_replicas": 2, "autoscaling": {"max_replicas": 3, "target": 0.5}},
        "ingress": {"autoscaling": {"max_replicas": 2}}}


def test_each_role_gets_our_router_and_serve_autoscaling_on_its_signal():
    config = AppConfig.model_validate(ARGS)
    for cls, settings, name, role in [
            (PrefillServer, config.prefill, "PrefillServer", PREFILL),
            (DecodeServer, config.decode, "DecodeServer", DECODE),
            (OpenAIIngress, config.ingress, "OpenAIIngress", "ingress")]:
        options = {**_options(settings, config), **_routing(config, settings, name, role)}
        cls.options(**options)  # Serve validates them here
        auto = options["autoscaling_config"]
        assert options["num_replicas"] is None
        assert (auto["min_replicas"], auto["max_replicas"]) == (
            settings.autoscaling.min_replicas, settings.autoscaling.max_replicas)
        if role == "ingress":
            assert "request_router_config" not in options and auto["target_ongoing_requests"]
            continue
        router = options["request_router_config"]
        assert router.request_router_kwargs == {"deployment": name, "role": role}
        assert router.request_router_class.endswith(DisaggRequestRouter.__name__)
        assert auto["policy"]["policy_kwargs"]["target"] == (10.0 if role == PREFILL else 0.5)
    assert _routing(config, config.decode, "DecodeServer", DECODE)["autoscaling_config"][
        "initial_replicas"] == 2


def test_without_autoscaling_the_replica_count_stays_fixed():
    config = AppConfig.model_validate({"model": "random:tiny-llama"})
    options = _routing(config, config.prefill, "PrefillServer", PREFILL)
    assert "autoscaling_config" not in options and "num_replicas" not in options


@dataclass
class FakeContext:
    """Test fake of Serve's AutoscalingContext: the fields the policy reads."""

    aggregated_metrics: dict | None
    target_num_replicas: int = 2


def test_load_policy_asks_for_total_load_over_target():
    policy = LoadAutoscalingPolicy(target=10.0)
    assert policy(FakeContext({"load": {"r1": 25.0, "r2": 5.0}}))[0] == pytest.approx(3.0)
    assert policy(FakeContext({"load": {"r1": 0.0}}))[0] == 0.0  # Serve applies min_replicas
    assert policy(FakeContext(None, target_num_replicas=2))[0] == 2  # no report yet: hold


def test_prefill_pools_each_with_its_sp_and_deployment():
    config = AppConfig.model_validate({"model": "random:tiny-llama", "prefill_pools": [
        {"name": "short", "num_replicas": 2}, {"name": "long", "sp": 2}]})
    assert {n: p.sp for n, p in config.pools.items()} == {"short": 1, "long": 2}
    assert [prefill_deployment(n) for n in config.pools] == [
        "PrefillServer_short", "PrefillServer_long"]
    assert list(AppConfig().pools) == [DEFAULT_POOL]
    assert prefill_deployment(DEFAULT_POOL) == "PrefillServer"
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"prefill_pools": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"routing": {"max_queue_wait_s": 60, "request_timeout_s": 30}})


def test_every_replica_trusts_queue_lengths_for_our_staleness(monkeypatch):
    monkeypatch.delenv(QUEUE_LENGTH_CACHE_ENV, raising=False)
    config = AppConfig.model_validate({"model": "random:tiny-llama", "gpu_peer_access": True,
                                       "prefill": {"num_gpus": 1}, "decode": {"num_gpus": 1}})
    for settings in (config.prefill, config.decode, config.ingress):
        env = _options(settings, config)["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env[QUEUE_LENGTH_CACHE_ENV] == "600"
    prefill_env = _options(config.prefill, config)["ray_actor_options"]["runtime_env"]
    assert prefill_env["env_vars"]["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv(QUEUE_LENGTH_CACHE_ENV, "10")  # the operator's own value wins
    env = _options(config.decode, config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env[QUEUE_LENGTH_CACHE_ENV] == "10"


def test_gpu_replicas_get_the_operators_cuda_module_loading(monkeypatch):
    config = AppConfig.model_validate({"model": "random:tiny-llama",
                                       "prefill": {"num_gpus": 1}, "decode": {"num_gpus": 0.5}})
    monkeypatch.delenv(CUDA_MODULE_LOADING_ENV, raising=False)
    for settings in (config.prefill, config.decode):  # unset: CUDA's own (lazy) default
        env = _options(settings, config)["ray_actor_options"]["runtime_env"]["env_vars"]
        assert CUDA_MODULE_LOADING_ENV not in env
    monkeypatch.setenv(CUDA_MODULE_LOADING_ENV, "EAGER")  # set after Ray started: passed on
    for settings in (config.prefill, config.decode):
        env = _options(settings, config)["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env[CUDA_MODULE_LOADING_ENV] == "EAGER"
    env = _options(config.ingress, config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert CUDA_MODULE_LOADING_ENV not in env  # no GPU, no CUDA context
    cpu = AppConfig.model_validate({"model": "random:tiny-llama"})
    env = _options(cpu.prefill, cpu)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert CUDA_MODULE_LOADING_ENV not in env


@pytest.mark.parametrize("name, value", [
    (CUDNN_AVOID_RECOMPILE_ENV, "1"),  # unset: torch's default (a plan per length)
    (PROFILE_PREFILLS_ENV, "/tmp/prefill-profiles"),  # unset: no profiling
])
def test_gpu_replicas_get_the_operators_value_of(monkeypatch, name, value):
    config = AppConfig.model_validate({"model": "random:tiny-llama",
                                       "prefill": {"num_gpus": 1}, "decode": {"num_gpus": 0.5}})
    monkeypatch.delenv(name, raising=False)
    env = _options(config.prefill, config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert name not in env
    monkeypatch.setenv(name, value)
    for settings in (config.prefill, config.decode):
        env = _options(settings, config)["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env[name] == value
    env = _options(config.ingress, config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert name not in env


def test_serve_reads_the_staleness_we_set_in_a_process_it_starts():
    """A fresh process, as Ray starts one with our environment: Serve's queue-length cache
    there uses our staleness (fails if Serve renames or stops reading the variable)."""
    code = ("from deployments.serve_env import set_process_env; set_process_env(); "
            "from ray.serve._private.request_router.common import ReplicaQueueLengthCache; "
            "print(ReplicaQueueLengthCache()._staleness_timeout_s)")
    env = {k: v for k, v in os.environ.items() if k != QUEUE_LENGTH_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert float(out.stdout.strip()) == QUEUE_LENGTH_CACHE_S
