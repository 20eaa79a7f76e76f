"""The application config: pydantic at the edge (YAML ``args`` of a Serve config file).

Every field has a default and a description; cross-field rules are validated on construction.
The engines receive frozen dataclasses built from it (``PrefillConfig``, ``DecodeConfig``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disagg.models.embedded import EMBEDDED_MODEL

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class TriangleMixSettings(BaseModel):
    model_config = _FROZEN
    enabled: bool = Field(False, description="run TriangleMix attention in prefill")
    triangle_layers: list[int] | None = Field(
        None, description="Triangle layers; default: the model's published split")
    n_sink: int = Field(8, ge=0, description="leading keys every row sees")
    n_window: int = Field(512, ge=1, description="sliding window, diagonal included")
    n_last: int = Field(128, ge=0, description="trailing rows that attend densely")


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class AutoscalingSettings(BaseModel):
    """Serve's ``autoscaling_config`` for one role; prefill and decode scale on the queue
    signal the router plans with (seconds of queued prefill per replica, by the cost model)."""

    model_config = _FROZEN
    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    max_replicas: int = Field(1, ge=1, description="most replicas")
    target: float | None = Field(
        None, gt=0, description="load per replica to aim for -- prefill: seconds of queued "
                                "prefill (default 10); decode: share of KV blocks or sequence "
                                "slots in use (default 0.8); ingress: ongoing requests (32)")
    upscale_delay_s: float = Field(5.0, ge=0, description="a scale-up must hold this long")
    downscale_delay_s: float = Field(60.0, ge=0, description="a scale-down must hold this long")

    @model_validator(mode="after")
    def _check_range(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling: min_replicas exceeds max_replicas")
        return self


class QueueBoundSettings(BaseModel):
    model_config = _FROZEN
    max_queued_requests: int = Field(64, ge=1, description="prompts queued per replica (the "
                                                           "running one included)")
    max_queued_tokens: int = Field(1 << 20, ge=1, description="their prompt tokens; an empty "
                                                              "queue takes any prompt")


class RoutingConfig(BaseModel):
    """The router (``disagg/routing.py``): path, pool and replica by the cost model, and
    admission (429 + Retry-After) before any work is done."""

    model_config = _FROZEN
    mode: Literal["auto", "local", "remote"] = Field(
        "auto", description="auto: the cost model and the queues choose; local / remote force "
                            "the path (benchmarks, tests)")
    max_queue_wait_s: float = Field(30.0, gt=0, description="refuse (429) a prompt whose "
                                                            "expected wait before its prefill "
                                                            "starts exceeds this")
    max_decode_stall_s: float = Field(
        1.0, gt=0, description="decode prefills a prompt itself only if that pauses its batch "
                               "at most this long (cost model)")
    sp_target_prefill_s: float = Field(
        2.0, gt=0, description="length buckets of the prefill pools: a prompt goes to the "
                               "smallest SP degree whose prefill takes at most this")
    prefill_queue: QueueBoundSettings = QueueBoundSettings()
    decode_queue: QueueBoundSettings = Field(
        QueueBoundSettings(max_queued_requests=64, max_queued_tokens=16384),
        description="bounds of a decode replica's own (local) prefills")
    request_timeout_s: float = Field(
        900.0, gt=0, description="an admitted request that has not ended by then gets a 504 "
                                 "error (longer than an admitted request may take)")
    stats_period_s: float = Field(1.0, gt=0, description="how often replicas report their "
                                                         "queues to the routers")
    cost_model: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="which fitted coefficients (disagg/cost_defaults.py); auto: by "
                            "the replicas' device")

    @model_validator(mode="after")
    def _check_timeout(self):
        if self.request_timeout_s <= self.max_queue_wait_s:
            raise ValueError("routing.request_timeout_s must exceed max_queue_wait_s")
        return self


class ReplicaSettings(BaseModel):
    model_config = _FROZEN
    num_replicas: int = Field(1, ge=1, description="replicas of this deployment")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractional ok)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 = run on CPU)")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Serve autoscaling for this role; None: num_replicas fixed")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each replica requires (e.g. "
                                          "{prefill: 1}): only nodes advertising them host it")

    @model_validator(mode="after")
    def _check_resources(self):
        for name, amount in self.resources.items():
            if name in RAY_BUILTIN_RESOURCES or amount <= 0:
                raise ValueError(f"resources: {name!r}: {amount} is not a custom resource amount "
                                 "(CPU, GPU, memory are num_cpus/num_gpus; amounts are > 0)")
        return self


KV_TRANSPORTS = ("cuda_ipc", "nccl", "gloo", "object_store")


class PrefillSettings(ReplicaSettings):
    lease_s: float = Field(60.0, gt=0, description="seconds KV published to the object store "
                                                   "waits to be copied by decode")
    max_leased_gib: float = Field(4.0, gt=0, description="refuse prompts while un-pulled KV "
                                                         "exceeds this (GiB)")
    lease_call_timeout_s: float = Field(
        30.0, gt=0, description="deadline of each call to the KV lease keeper (publish a "
                                "lease, count leases); one that does not answer fails the call")
    lease_owner_check_s: float = Field(
        1.0, gt=0, description="how often the lease keeper looks for leases whose decode "
                               "replica is gone (it died before pulling): they end then")
    sp: int = Field(1, ge=1, description="sequence-parallel degree: ranks (GPUs, or CPU "
                                         "processes) of one replica's SP group")
    whole_node: bool = Field(
        False, description="one placement group per replica: its sp ranks (num_cpus/num_gpus "
                           "each) STRICT_PACKed on one node whose `resources` it takes, so with "
                           "nodes advertising them once a group fills a node (cluster/README.md)")

    @model_validator(mode="after")
    def _check_whole_node(self):
        if self.whole_node and not self.resources:
            raise ValueError("prefill.whole_node needs `resources` naming what a prefill node "
                             "advertises once (e.g. {prefill_node: 1}): it keeps other groups off")
        return self


class PrefillPoolSettings(PrefillSettings):
    """One prefill pool of several (``prefill_pools``): its replicas, SP degree and all."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_]+$", description="the pool's name (its "
                                                                   "deployment: PrefillServer_<name>)")


DEFAULT_POOL = "default"


class DecodeSettings(ReplicaSettings):
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV pool size per replica (GiB)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded together")
    remote_kv_timeout_s: float = Field(
        300.0, gt=0, description="deadline of a disaggregated request from block reservation "
                                 "until its KV is usable (its KV destination expires with it); "
                                 "token 0 from prefill, then the completion record, each wait "
                                 "at most this too")
    cancel_grace_s: float = Field(
        10.0, gt=0, description="rows of a request cancelled mid-prefill stay fenced this long "
                                "(a cancelled prefill stops writing at its next layer)")
    async_scheduling: bool | None = Field(
        None, description="queue each decode step before reading the previous one's tokens "
                          "(host work overlaps the GPU's); null: on for CUDA replicas")
    on_kv_failure: Literal["error", "local_prefill"] = Field(
        "error", description="a KV hand-off that fails after token 0: end the request with an "
                             "error, or recompute prompt + token 0 here (reported as "
                             "kv_recomputed in the usage's disagg_timing)")


class IngressSettings(ReplicaSettings):
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per ingress replica")
    api_key_env: str | None = Field(
        None, description="environment variable (of the ingress replica) holding the required "
                          "Bearer token; the key itself is never part of a config")
    api_key_file: Path | None = Field(
        None, description="file (on the ingress replica's node) holding the required Bearer "
                          "token; neither set: the API is open")
    max_body_bytes: int | None = Field(
        None, ge=1024, description="request body limit; default admits a max-context prompt "
                                   "as token ids")
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="a request body still arriving after this is refused (408)")
    max_tokens_limit: int | None = Field(
        4096, ge=1, description="server-side cap on generated tokens per request: more is a "
                                "400, none asked gets at most this; None = the context's rest")
    max_queued_requests: int | None = Field(
        256, ge=1, description="requests Serve's HTTP proxy holds for an ingress replica (all "
                               "busy, or none alive while one restarts); past this the proxy "
                               "answers 503 with Retry-After at once; None: no bound")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After of the proxy's 503s")

    @model_validator(mode="after")
    def _check_api_key(self):
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("ingress: set api_key_env or api_key_file, not both")
        return self

    def read_api_key(self) -> bytes | None:
        """The Bearer token, read where the ingress runs (the edge); an unset variable, an
        unreadable or empty file is an error, never an open API."""
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env, "")
            where = f"environment variable {self.api_key_env}"
        elif self.api_key_file is not None:
            key = self.api_key_file.read_text().strip()
            where = f"file {self.api_key_file}"
        else:
            return None
        if not key:
            raise ValueError(f"ingress: the API key {where} is unset or empty")
        return key.encode()


class AppConfig(BaseModel):
    """Everything ``build_app`` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    model: str = Field(EMBEDDED_MODEL, description="embedded name, random:<config> or a "
                                                   "local HF directory")
    served_model_name: str | None = Field(None, description="name clients use; default: model")
    cache_dir: Path | None = Field(None, description="model cache; default DISAGG_CACHE_DIR "
                                                     "or ~/.cache/disagg")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on GPU), float32, "
                                           "bfloat16, float16")
    seed: int = Field(0, description="seed of random-weight models")
    local_prefill_max_tokens: int | None = Field(
        None, ge=0, description="fixed threshold: prompts shorter than this are prefilled by "
                                "decode, longer ones remote (tests); None: the router's cost "
                                "model and queues decide")
    trianglemix: TriangleMixSettings = TriangleMixSettings()
    kv_transports: list[str] | None = Field(
        None, description="KV backends decode offers, in order of preference (cuda_ipc, nccl, "
                          "gloo, object_store); default: cuda_ipc then object_store on GPU, "
                          "object_store on CPU")
    gpu_peer_access: bool = Field(
        False, description="start GPU replicas with every GPU of their node visible, each "
                           "using its own, so cuda_ipc works between replicas on different "
                           "GPUs of one node (NVLink peer copies)")
    prefill: PrefillSettings = PrefillSettings()
    decode: DecodeSettings = DecodeSettings()
    ingress: IngressSettings = IngressSettings()
    routing: RoutingConfig = RoutingConfig()
    prefill_pools: list[PrefillPoolSettings] = Field(
        default_factory=list, description="several prefill pools (e.g. one per SP degree), "
                                          "chosen by prompt length; empty: one pool, `prefill`")
    health_check_period_s: float = Field(5.0, gt=0, description="Serve health-check period")
    drain_timeout_s: float = Field(
        30.0, gt=0, description="on shutdown, how long a replica may finish its in-flight "
                                "requests before it is stopped (Serve's graceful timeout)")

    @model_validator(mode="after")
    def _check(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype}")
        if (self.prefill.num_gpus == 0) != (self.decode.num_gpus == 0):
            raise ValueError("prefill and decode must both run on GPU or both on CPU "
                             "(KV moves between them in one dtype)")
        gpu = self.decode.num_gpus > 0
        for name in self.kv_transports or ():
            if name not in KV_TRANSPORTS:
                raise ValueError(f"unknown KV transport {name!r} (known: {KV_TRANSPORTS})")
            if (name in ("cuda_ipc", "nccl") and not gpu) or (name == "gloo" and gpu):
                raise ValueError(f"KV transport {name!r} does not run with decode on "
                                 f"{'GPU' if gpu else 'CPU'}")
        if self.kv_transports is not None and not self.kv_transports:
            raise ValueError("kv_transports must name at least one backend")
        return self

    @model_validator(mode="after")
    def _check_pools(self):
        names = [p.name for p in self.prefill_pools]
        if len(set(names)) != len(names):
            raise ValueError(f"prefill_pools: names must be unique, not {names}")
        if any((p.num_gpus == 0) != (self.decode.num_gpus == 0) for p in self.prefill_pools):
            raise ValueError("prefill_pools: every pool runs where decode does (GPU or CPU)")
        return self

    @property
    def transports(self) -> tuple[str, ...]:
        """The KV backends decode offers, in order of preference."""
        if self.kv_transports:
            return tuple(self.kv_transports)
        return ("cuda_ipc", "object_store") if self.decode.num_gpus > 0 else ("object_store",)

    @property
    def pools(self) -> dict[str, PrefillSettings]:
        """Prefill pools by name (``prefill`` alone is the pool ``default``)."""
        if not self.prefill_pools:
            return {DEFAULT_POOL: self.prefill}
        return {p.name: p for p in self.prefill_pools}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
