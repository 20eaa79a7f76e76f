"""What every replica does at start: size its threads, load its model, pick device and dtype,
and make its first use of Ray's object store."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from disagg_kernels.triangle_mix import TriangleParams

from deployments.config import AppConfig
from disagg.attention.triangle import TriangleMixConfig, published_trianglemix
from disagg.cli import default_cache_dir
from disagg.models.config import ModelConfig
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import ModelSource, load_model, load_tokenizer, resolve_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Over Ray's inline limit for call arguments (100 KiB): such arguments -- a prompt of more than
# ~12K token ids -- go through the object store.
_OBJECT_STORE_WARMUP_BYTES = 1 << 20


@dataclass
class ReplicaModel:
    source: ModelSource
    config: ModelConfig
    model: LlamaForCausalLM | None
    tokenizer: object | None


def resolve_source(config: AppConfig) -> ModelSource:
    return resolve_model(config.model, cache_dir=config.cache_dir or default_cache_dir(),
                         seed=config.seed)


def load_replica_model(config: AppConfig, *, num_cpus: float, num_gpus: float,
                       with_weights: bool = True) -> ReplicaModel:
    """Load the model for a replica reserving ``num_cpus`` / ``num_gpus``."""
    torch.set_num_threads(max(1, math.ceil(num_cpus)))
    warm_object_store()
    source = resolve_source(config)
    model = None
    if with_weights:
        device = replica_device(config, num_gpus)
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[config.dtype]
        model = load_model(source, device=device, dtype=dtype)
    return ReplicaModel(source, source.model_config(), model, load_tokenizer(source))


def warm_object_store() -> None:
    """Put and get one object of the object store's size class in this process: its first use
    then happens here, before the replica is ready, not inside the first long prompt's TTFT.
    On CPU a chain of two actors paid 3-93 ms more for its first such argument without it,
    0-1 ms with it; in served 32K runs on an H200 no change was measurable (RESULTS.md)."""
    import ray

    if ray.is_initialized():
        ray.get(ray.put(bytes(_OBJECT_STORE_WARMUP_BYTES)))


def local_proxy_url(timeout_s: float = 10.0) -> str | None:
    """``http://host:port`` of the Serve HTTP proxy on this node, or None where none runs here.
    Reads Serve 2.60's proxy actor (named ``SERVE_PROXY_ACTOR-<node id>``) for its options."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    name = f"{SERVE_PROXY_NAME}-{ray.get_runtime_context().get_node_id()}"
    try:
        proxy = ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    options = ray.get(proxy._get_http_options.remote(), timeout=timeout_s)
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(options.host,
                                                                        options.host)
    return f"http://{host}:{options.port}"


def replica_device(config: AppConfig, num_gpus: float) -> torch.device:
    """This replica's device. With ``gpu_peer_access`` every GPU of the node is visible, so
    the replica selects the one Ray assigned it (its physical index)."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not config.gpu_peer_access:
        return torch.device("cuda")
    import ray

    device = torch.device("cuda", int(ray.get_gpu_ids()[0]))
    torch.cuda.set_device(device)
    return device


def trianglemix_config(config: AppConfig, model_config: ModelConfig) -> TriangleMixConfig | None:
    settings = config.trianglemix
    if not settings.enabled:
        return None
    params = TriangleParams(settings.n_sink, settings.n_window, settings.n_last)
    if settings.triangle_layers is not None:
        tm = TriangleMixConfig(tuple(settings.triangle_layers), params)
    else:
        tm = published_trianglemix(config.model, params)
    tm.validate_for(model_config.num_layers)
    return tm
