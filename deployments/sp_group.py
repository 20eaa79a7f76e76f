"""A prefill replica's sequence-parallel group: the replica is rank 0, Ray actors the others.

Life of a group (``SPGroupEngine.start``, once in the replica's constructor; ``prefill.sp > 1``):
1. ``sp - 1`` ``SPRankActor``s start in the replica's placement group (bundles 1..sp-1 of
   ``deployments/placement.py``'s ``STRICT_PACK`` group, one rank per GPU or CPU share), each
   loading the model and its own KV senders.
2. The replica picks a rendezvous address; every rank and the replica join one
   torch.distributed group (NCCL on GPU, gloo on CPU) with the collective deadline, once.
3. A warm-up prefill runs through the whole group (first collectives, kernels).
Life of a request (``run_prefill`` drives it as it drives the single-device engine):
1. ``open_writer``: rank 0's writer of its own rows; the other ranks open theirs for their
   rows when their part of the prefill starts (they get the offers and any cuda_ipc export).
2. ``prefill``: the other ranks are called, rank 0 runs its shard on the worker thread; the
   group's status checks stop every rank at once on cancellation or a failed write.
3. Token 0 comes from rank 0; ``finish`` confirms every rank's writes and merges the records;
   ``abort`` aborts every rank's writer.
Failure: a rank that dies or a collective past its deadline fails the request with
``SPGroupError`` and marks the group broken; ``check_health`` then fails, so Serve replaces the
replica (its rank actors are owned by it and die with it; ``shutdown`` kills them first).
"""

from __future__ import annotations

import gc
import socket
import threading
import time
import uuid
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import AppConfig
from deployments.kv_transports import build_senders
from deployments.runtime import load_replica_model, replica_device, trianglemix_config
from deployments.serve_env import gpu_env
from disagg.errors import DisaggError
from disagg.prefill.engine import PrefillBusyError, PrefillEngine, PrefillResult
from disagg.prefill.sequence_parallel import (
    SHARDABLE_BACKENDS,
    RankPrefillResult,
    SequenceParallelPrefill,
    merge_completions,
)
from disagg.prefill.sp_comm import SPCollectiveError, TorchDistCollectives
from disagg.request import EngineRequest
from disagg.transport.base import (
    KVCompletion,
    KVDestination,
    KVHeader,
    KVWriter,
    decode_offers,
    encode_offers,
)
from disagg.transport.direct import CUDA_IPC, CudaIpcExport

COLLECTIVE_TIMEOUT_S = 120.0  # one collective's deadline (a layer of a 1M-token prompt < 10 s)
RPC_TIMEOUT_S = 60.0  # a control call to a rank (join, finish, abort, ping)
WARMUP_TOKENS = 64
RANK_NAMESPACE = "disagg_sp"  # rank actors are named sp-rank-<replica id>-<rank> there


class SPGroupError(DisaggError):
    """A rank of the SP group died or stalled: the request fails, the replica is replaced."""


def _engine(config: AppConfig, device: torch.device, model) -> PrefillEngine:
    senders = tuple(s for s in build_senders(config, device) if s.backend in SHARDABLE_BACKENDS)
    return PrefillEngine(model, model_name=config.model_name,
                         trianglemix=trianglemix_config(config, model.config), senders=senders)


def _join(rank: int, world: int, init_method: str, device: torch.device,
          engine: PrefillEngine) -> SequenceParallelPrefill:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return SequenceParallelPrefill(engine, TorchDistCollectives(None,
                                                                timeout_s=COLLECTIVE_TIMEOUT_S))


def _warmup_request(vocab_size: int) -> EngineRequest:
    return EngineRequest.random_prefill("sp-warmup", WARMUP_TOKENS, vocab_size=vocab_size,
                                        context=WARMUP_TOKENS + 1)


@ray.remote(max_concurrency=4)  # finish/abort/ping of one request while another one runs
class SPRankActor:
    """Rank ``rank`` (>= 1) of a replica's SP group: its weights, senders and writers."""

    def __init__(self, config: AppConfig, rank: int, world: int):
        settings = config.prefill
        loaded = load_replica_model(config, num_cpus=settings.num_cpus,
                                    num_gpus=settings.num_gpus)
        self.device = replica_device(config, settings.num_gpus)
        self.engine = _engine(config, self.device, loaded.model)
        self.rank, self.world = rank, world
        self.sp: SequenceParallelPrefill | None = None
        self._writers: dict[str, KVWriter] = {}
        self._lock = threading.Lock()

    def join(self, init_method: str) -> None:
        self.sp = _join(self.rank, self.world, init_method, self.device, self.engine)

    def warm_up(self, request: EngineRequest) -> None:
        """The group's start-up prefill: the last thing before the group serves. Then, as Serve
        does for its replicas (``RAY_SERVE_FREEZE_GC_ON_STARTUP``) but not for actors like this
        one: collect, and freeze the start-up heap, so no full collection inside a request
        walks the model and modules (a pause here would hold every rank at a collective)."""
        self.sp.prefill(request)
        gc.collect()
        gc.freeze()

    def register(self, export: CudaIpcExport) -> None:
        ipc = self.engine.senders.get(CUDA_IPC)
        if ipc is not None:
            ipc.register(export)

    def prefill(self, request: EngineRequest, offers: bytes) -> RankPrefillResult:
        writer = self.sp.open_writer(decode_offers(offers))
        with self._lock:
            self._writers[request.request_id] = writer
        try:
            return self.sp.prefill(request, writer)
        except BaseException:
            self.abort(request.request_id)
            raise

    def finish(self, request_id: str, header: KVHeader) -> KVCompletion:
        with self._lock:
            writer = self._writers.pop(request_id)
        return writer.finish(header)

    def abort(self, request_id: str) -> None:
        with self._lock:
            writer = self._writers.pop(request_id, None)
        if writer is not None:
            writer.abort()

    def leased(self) -> tuple[int, int]:
        counts = [s.leased() for s in self.engine.senders.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def ping(self) -> int:
        return self.rank


class SPGroupWriter:
    """The group's writer of one request: rank 0's own, plus the other ranks' (remote)."""

    def __init__(self, group: SPGroupEngine, local: KVWriter, offers: tuple[KVDestination, ...]):
        self.group, self.local, self.offers = group, local, offers

    def write_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.local.write_layer(layer, k, v)  # rank 0's rows; the other ranks write their own

    def finish(self, header: KVHeader) -> KVCompletion:
        remote = [a.finish.remote(header.request_id, header) for a in self.group.ranks]
        local = self.local.finish(header)
        return merge_completions([local, *self.group.get(remote, "finish")])

    def abort(self) -> None:
        refs = [a.abort.remote(self.offers[0].request_id) for a in self.group.ranks]
        self.local.abort()
        try:
            self.group.get(refs, "abort")
        except SPGroupError:  # a dead rank writes nothing more; the group is marked broken
            pass


class SPGroupEngine:
    """The replica's prefill engine when ``sp > 1``: what ``run_prefill`` calls, over the group."""

    def __init__(self, engine: PrefillEngine, sp: SequenceParallelPrefill, ranks: list):
        self.engine, self.sp, self.ranks = engine, sp, ranks
        self.broken: str | None = None
        self._exports: dict[str, CudaIpcExport] = {}

    @classmethod
    def start(cls, config: AppConfig, engine: PrefillEngine) -> SPGroupEngine:
        world = config.prefill.sp
        if not set(config.transports) & set(SHARDABLE_BACKENDS):
            raise ValueError(f"prefill.sp = {world} needs a KV backend every rank can write its "
                             f"own rows through ({', '.join(SHARDABLE_BACKENDS)}); "
                             f"kv_transports are {list(config.transports)}")
        pg = ray.util.get_current_placement_group()
        ranks = []
        replica = _replica_name()
        for rank in range(1, world):
            options = {"num_cpus": config.prefill.num_cpus, "num_gpus": config.prefill.num_gpus,
                       "name": f"sp-rank-{replica}-{rank}", "namespace": RANK_NAMESPACE}
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank)
            if config.prefill.num_gpus > 0:  # as the replica's own (deployments/app._options)
                env = gpu_env()
                if config.gpu_peer_access:
                    env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
                options["runtime_env"] = {"env_vars": env}
            ranks.append(SPRankActor.options(**options).remote(config, rank, world))
        group = cls(engine, None, ranks)
        try:
            init_method = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
            joined = [a.join.remote(init_method) for a in ranks]
            group.sp = _join(0, world, init_method, engine.device, engine)
            group.get(joined, "join")
            request = _warmup_request(engine.model.config.vocab_size)
            warm = [a.warm_up.remote(request) for a in ranks]
            group.sp.prefill(request)
            group.get(warm, "warm-up")
        except BaseException:
            group.shutdown()
            raise
        return group

    # -- what run_prefill and the server call ---------------------------------------------

    @property
    def senders(self):
        return self.engine.senders

    def register(self, export: CudaIpcExport) -> None:
        """Map a decode pool's IPC handles on every rank (once per endpoint)."""
        if export.endpoint in self._exports:
            return
        ipc = self.engine.senders.get(CUDA_IPC)
        if ipc is not None:
            ipc.register(export)
        self.get([a.register.remote(export) for a in self.ranks], "register")
        self._exports[export.endpoint] = export

    def open_writer(self, offers: tuple[KVDestination, ...]) -> SPGroupWriter:
        self._check()
        return SPGroupWriter(self, self.sp.open_writer(offers), tuple(offers))

    def prefill(self, request: EngineRequest, sink: SPGroupWriter, cancelled=None
                ) -> PrefillResult:
        self._check()
        t0 = time.perf_counter()
        offers = encode_offers(sink.offers)
        remote = [a.prefill.remote(request, offers) for a in self.ranks]
        try:
            local = self.sp.prefill(request, sink.local, cancelled)
        except SPCollectiveError as e:
            self.broken = f"collective failed: {e}"
            raise SPGroupError(f"SP prefill of {request.request_id!r} failed: {e}") from e
        finally:
            outcome = self._settle(remote)
        if outcome is not None:
            raise outcome
        return PrefillResult(request.request_id, local.first_token,
                             self.engine.fingerprint(request.num_prompt_tokens),
                             time.perf_counter() - t0)

    def _settle(self, refs) -> Exception | None:
        """Wait for the other ranks' parts; a dead rank breaks the group."""
        try:
            ray.get(refs, timeout=COLLECTIVE_TIMEOUT_S + RPC_TIMEOUT_S)
        except ray.exceptions.RayActorError as e:
            self.broken = f"a rank died: {e}"
            return SPGroupError(f"an SP rank died: {e}")
        except ray.exceptions.GetTimeoutError:
            self.broken = "a rank stalled"
            return SPGroupError("an SP rank did not finish its part in time")
        except ray.exceptions.RayTaskError as e:  # rank 0's own error, if any, comes first
            return SPGroupError(f"an SP rank failed its part: {e}")
        return None

    def leased(self) -> tuple[int, int]:
        counts = [self.engine.leased(), *self.get([a.leased.remote() for a in self.ranks],
                                                  "leased")]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def check_capacity(self) -> None:
        """Refuse work while the group's un-pulled object-store KV exceeds the budget."""
        _, leased_bytes = self.leased()
        if leased_bytes > self.engine.config.max_leased_bytes:
            raise PrefillBusyError(f"{leased_bytes} bytes of KV wait to be pulled (budget "
                                   f"{self.engine.config.max_leased_bytes}); retry later")

    def check_health(self) -> None:
        """Raise if the group cannot serve: broken by a failure, or a rank gone."""
        self._check()
        self.get([a.ping.remote() for a in self.ranks], "ping")

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        self.ranks = []
        if dist.is_initialized():
            dist.destroy_process_group()

    def get(self, refs, what: str):
        try:
            return ray.get(refs, timeout=RPC_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            self.broken = f"{what}: {e}"
            raise SPGroupError(f"SP group {what} failed: {e}") from e

    def _check(self) -> None:
        if self.broken is not None:
            raise SPGroupError(f"the SP group is broken ({self.broken}); the replica is being "
                               "replaced")


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 (outside Serve: a group of its own)
        return uuid.uuid4().hex[:8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
