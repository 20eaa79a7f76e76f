"""``build_app(config)``: the whole Serve application in one function.

```
client ──HTTP/SSE──► OpenAIIngress      auth, strict validation, tokenize, route, stream
                         │  prompt < local_prefill_max_tokens ?
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

from ray.serve import Application

from deployments.config import AppConfig, ReplicaSettings
from deployments.decode_server import DecodeServer
from deployments.ingress import OpenAIIngress
from deployments.placement import actor_resources, prefill_placement
from deployments.prefill_server import PrefillServer
from deployments.runtime import resolve_source, trianglemix_config
from disagg.cli import default_cache_dir


def _options(settings: ReplicaSettings, config: AppConfig) -> dict:
    actor = actor_resources(settings)  # CPUs, GPUs and the custom resources of its node type
    if config.gpu_peer_access and settings.num_gpus > 0:
        # Ray would show the replica only its own GPU; cuda_ipc handles of a pool on another
        # GPU open only where that GPU is visible (runtime.replica_device picks our own).
        actor["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
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


def build_app(config: AppConfig) -> Application:
    """The Serve application for ``config`` (the graph above)."""
    # Resolve the cache here (the environment is read at this edge, not in replicas) and
    # prepare the model once, before any replica starts: no conversion race. A bad model name
    # or TriangleMix split fails here, not in a replica.
    config = config.model_copy(update={"cache_dir": config.cache_dir or default_cache_dir()})
    trianglemix_config(config, resolve_source(config).model_config())
    prefill = PrefillServer.options(**_options(config.prefill, config),
                                    **prefill_placement(config.prefill)).bind(config)
    decode = DecodeServer.options(**_options(config.decode, config)).bind(config, prefill)
    return OpenAIIngress.options(**_options(config.ingress, config)).bind(config, decode)


def app_builder(args: dict) -> Application:
    """Entry point of the Serve config files (``import_path: deployments.app:app_builder``)."""
    return build_app(AppConfig.model_validate(args or {}))
