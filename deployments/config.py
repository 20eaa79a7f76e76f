"""The application config: pydantic at the edge (YAML ``args`` of a Serve config file).

Every field has a default and a description; cross-field rules are validated on construction.
The engines receive frozen dataclasses built from it (``PrefillConfig``, ``DecodeConfig``).
"""

from __future__ import annotations

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


class ReplicaSettings(BaseModel):
    model_config = _FROZEN
    num_replicas: int = Field(1, ge=1, description="replicas of this deployment")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractional ok)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 = run on CPU)")
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


class DecodeSettings(ReplicaSettings):
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV pool size per replica (GiB)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded together")
    remote_kv_timeout_s: float = Field(
        300.0, gt=0, description="deadline of a disaggregated request from block reservation "
                                 "until its KV is usable (its KV destination expires with it)")
    cancel_grace_s: float = Field(
        10.0, gt=0, description="rows of a request cancelled mid-prefill stay fenced this long "
                                "(a cancelled prefill stops writing at its next layer)")
    on_kv_failure: Literal["error", "local_prefill"] = Field(
        "error", description="a KV hand-off that fails after token 0: end the request with an "
                             "error, or recompute prompt + token 0 here (reported as "
                             "kv_recomputed in the usage's disagg_timing)")


class IngressSettings(ReplicaSettings):
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per ingress replica")
    api_key: str | None = Field(None, description="required Bearer token; None = open")
    max_body_bytes: int | None = Field(
        None, ge=1024, description="request body limit; default admits a max-context prompt "
                                   "as token ids")


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
    local_prefill_max_tokens: int = Field(
        512, ge=0, description="prompts shorter than this are prefilled by decode itself")
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

    @property
    def transports(self) -> tuple[str, ...]:
        """The KV backends decode offers, in order of preference."""
        if self.kv_transports:
            return tuple(self.kv_transports)
        return ("cuda_ipc", "object_store") if self.decode.num_gpus > 0 else ("object_store",)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
