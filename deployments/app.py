"""``build_app(config)``: the whole Serve application in one function.

```
client ──HTTP/SSE──► OpenAIIngress      auth, strict validation, tokenize, route, stream
                         │  router: plan by cost model + queues, or 429
                         ▼
                    DecodeServer ×N      local: prefill itself (dense), decode
                         │  long prompt: reserve blocks, offer KV destinations,
                         │  then call (streaming) ───────────────────► PrefillServer ×M
                         │                                              TriangleMix prefill;
                         │  ◄═ each layer's K/V, written as computed ══ cuda_ipc / nccl /
                         │  ◄── token 0 (at once), then the KV ──────── object store
                         │      completion record
                         ▼  decode once every layer is confirmed
                    tokens stream back through the ingress
```
``serve run deployments/prefill_decode.yaml`` calls ``app_builder`` with the YAML's ``args``.
"""

from __future__ import annotations

import secrets

from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.admission import DECODE_DEPLOYMENT, prefill_deployment
from deployments.config import DEFAULT_POOL, AppConfig, ReplicaSettings
from deployments.decode_server import DecodeServer
from deployments.ingress import OpenAIIngress
from deployments.placement import actor_resources, prefill_placement
from deployments.prefill_server import PrefillServer
from deployments.router import DECODE, PREFILL, DisaggRequestRouter
from deployments.runtime import resolve_source, trianglemix_config
from deployments.serve_env import gpu_env, serve_env
from disagg.cli import default_cache_dir


def _options(settings: ReplicaSettings, config: AppConfig) -> dict:
    actor = actor_resources(settings)  # CPUs, GPUs and the custom resources of its node type
    env = serve_env()  # Serve's settings for this replica's own routers (deployments/serve_env)
    if settings.num_gpus > 0:
        env.update(gpu_env())  # an operator's CUDA module loading (deployments/serve_env)
    if config.gpu_peer_access and settings.num_gpus > 0:
        # Ray would show the replica only its own GPU; cuda_ipc handles of a pool on another
        # GPU open only where that GPU is visible (runtime.replica_device picks our own).
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    actor["runtime_env"] = {"env_vars": env}
    return {
        "num_replicas": settings.num_replicas,
        "ray_actor_options": actor,
        "health_check_period_s": config.health_check_period_s,
        "max_ongoing_requests": 256,
        # On delete/shutdown (deployments/launch.py drains this way): Serve stops routing to
        # the replica, which finishes its in-flight requests for up to drain_timeout_s.
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
    }


_DEFAULT_TARGET = {PREFILL: 10.0, DECODE: 0.8, "ingress": 32.0}


def _routing(config: AppConfig, settings: ReplicaSettings, deployment: str, role: str) -> dict:
    """Routing and scaling options of a role: our request router (plans, reports, in-flight
    counts) and, when ``autoscaling`` is set, Serve's autoscaling on the same queue signal."""
    options = {}
    if role == "ingress" and settings.max_queued_requests is not None:
        # Serve's proxy holds a request until an ingress replica takes it, also while none is
        # alive (one restarting); past this bound it answers 503 + Retry-After at once.
        options["max_queued_requests"] = settings.max_queued_requests
        options["backpressure_config"] = BackpressureConfig(status_code=503,
                                                            retry_after_s=settings.retry_after_s)
    if role != "ingress":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=DisaggRequestRouter,
            request_router_kwargs={"deployment": deployment, "role": role},
            request_routing_stats_period_s=config.routing.stats_period_s)
    scaling = settings.autoscaling
    if scaling is not None:
        target = scaling.target or _DEFAULT_TARGET[role]
        auto = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                "initial_replicas": max(scaling.min_replicas,
                                        min(settings.num_replicas, scaling.max_replicas)),
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s}
        if role == "ingress":
            auto["target_ongoing_requests"] = target
        else:
            auto["policy"] = {"policy_function": "deployments.router:LoadAutoscalingPolicy",
                              "policy_kwargs": {"target": target}}
        options["autoscaling_config"] = auto
        options["num_replicas"] = None  # Serve's autoscaler owns the count
    return options


def build_app(config: AppConfig) -> Application:
    """The Serve application for ``config`` (the graph above)."""
    # Resolve the cache here (the environment is read at this edge, not in replicas) and
    # prepare the model once, before any replica starts: no conversion race. A bad model name
    # or TriangleMix split fails here, not in a replica.
    config = config.model_copy(update={"cache_dir": config.cache_dir or default_cache_dir()})
    trianglemix_config(config, resolve_source(config).model_config())
    pools = {}
    for pool, settings in config.pools.items():  # each pool's replicas see it as `prefill`
        name = prefill_deployment(pool)
        pools[pool] = PrefillServer.options(
            name=name, **{**_options(settings, config), **_routing(config, settings, name,
                                                                    PREFILL)},
            **prefill_placement(settings)).bind(config.model_copy(update={"prefill": settings}))
    decode = DecodeServer.options(
        **{**_options(config.decode, config),
           **_routing(config, config.decode, DECODE_DEPLOYMENT, DECODE)},
    ).bind(config, pools[DEFAULT_POOL] if list(pools) == [DEFAULT_POOL] else pools)
    return OpenAIIngress.options(
        **{**_options(config.ingress, config),
           **_routing(config, config.ingress, "OpenAIIngress", "ingress")},
    ).bind(config, decode, warmup_token=secrets.token_urlsafe(16))


def app_builder(args: dict) -> Application:
    """Entry point of the Serve config files (``import_path: deployments.app:app_builder``)."""
    return build_app(AppConfig.model_validate(args or {}))
