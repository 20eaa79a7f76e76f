"""PrefillServer: a Serve deployment wrapping the prefill engine.

Life of a request here (``prefill``, a streaming call from the decode replica that reserved
the request's blocks):
1. The offered KV destinations arrive as msgpack; a decode pool's cuda_ipc handles are mapped
   the first time this replica sees them (then kept).
2. ``run_prefill`` (``disagg/prefill/worker.py``): the prompt runs on the single worker thread
   (the event loop stays free for stats, health checks and other streams), each layer's KV
   written towards the first destination this replica can reach.
3. Token 0 is yielded the moment it is sampled; the ``KVCompletion`` record follows once every
   layer's write is confirmed. A cancelled call stops the worker at its next layer.
Un-pulled object-store KV over the budget makes ``prefill`` answer 503 (``PrefillBusyError``).
Ready only after a warm-up that compiles every kernel a served prefill runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from deployments.admission import cost_model_for, triangle_fraction
from deployments.config import AppConfig
from deployments.kv_transports import build_senders
from deployments.load import prefill_report, queue_seconds
from deployments.messages import PrefillStats, is_warmup
from deployments.metrics import Metrics
from deployments.runtime import load_replica_model, replica_device, trianglemix_config
from deployments.sp_group import SPGroupEngine
from disagg.disaggregated import FirstToken, PrefillEvent
from disagg.errors import ReplicaMemoryError
from disagg.kv.paged_cache import free_memory_note
from disagg.prefill.engine import PrefillConfig, PrefillEngine
from disagg.prefill.profiling import FirstPrefillProfiler
from disagg.prefill.warmup import WarmupReport, warm_up_prefill
from disagg.prefill.worker import run_prefill
from disagg.request import EngineRequest
from disagg.routing import ReplicaQueue, RoutePlan
from disagg.transport.base import decode_offers
from disagg.transport.direct import CUDA_IPC, CudaIpcExport

_GIB = 1 << 30
logger = logging.getLogger("ray.serve")  # Serve writes it to this replica's log file


@serve.deployment
class PrefillServer:
    def __init__(self, config: AppConfig):
        settings = config.prefill
        loaded = load_replica_model(config, num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
        self._eos = loaded.config.eos_token_ids
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")
        self._metrics = Metrics()
        self._queued_tokens = 0
        self._num_running = 0
        self._num_prefills = 0
        self._num_warmups = 0
        # Its FIFO as the router sees it (routing stats), kept on the event loop: a report
        # never waits behind the prefill worker.
        self._queue = ReplicaQueue()
        self._measured: deque[tuple[int, int, float]] = deque(maxlen=16)  # (seq, tokens, s)
        self._cost = cost_model_for(config, loaded.config)
        self._sp, self._triangle_fraction = settings.sp, triangle_fraction(config, loaded.config)
        self.engine = PrefillEngine(
            loaded.model, model_name=config.model_name,
            trianglemix=trianglemix_config(config, loaded.config),
            senders=build_senders(config, replica_device(config, settings.num_gpus)),
            config=PrefillConfig(max_leased_bytes=int(settings.max_leased_gib * _GIB)),
        )
        # Off unless the operator sets DISAGG_PROFILE_PREFILLS (disagg/prefill/profiling.py).
        profiler = FirstPrefillProfiler.from_env(self.engine.device)
        self._profile = profiler.around if profiler is not None else None
        self._sp_group = None
        if settings.sp > 1:  # this replica is rank 0 of an SP group (deployments/sp_group.py)
            self.engine = self._sp_group = SPGroupEngine.start(config, self.engine)
            logger.info("PrefillServer: SP group of %d ranks ready", settings.sp)
        else:
            # On the thread that serves prefills: cuDNN keeps its plans per thread.
            report = self._warm_up(config)
            logger.info("PrefillServer warm-up: prompts of %s tokens in %.1f s",
                        report.prompt_lengths, report.seconds)
            for timing in report.dense_kernels:
                logger.info("PrefillServer dense attention at %d tokens: %s", timing.tokens,
                            timing.as_row())

    def _warm_up(self, config: AppConfig) -> WarmupReport:
        """``warm_up_prefill`` on the worker thread; out of memory, an error naming the fix."""
        try:
            return self._executor.submit(warm_up_prefill, self.engine).result()
        except torch.OutOfMemoryError as e:
            device = self.engine.device
            raise ReplicaMemoryError(
                f"PrefillServer warm-up ran out of memory on {device}"
                f"{free_memory_note(device)}: its prefills and attention timings reach the "
                f"longest prompt ({self.engine.model.config.max_context_tokens - 1} tokens) "
                "and need activations beyond the weights. On a GPU shared with decode, lower "
                f"decode.kv_cache_gib (now {config.decode.kv_cache_gib:g}); another process "
                "on the GPU (a replica still exiting) holds memory too. torch: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    async def prefill(self, request: EngineRequest, offers: bytes,
                      cuda_ipc: CudaIpcExport | None = None, plan: RoutePlan | None = None
                      ) -> AsyncIterator[PrefillEvent]:
        # ``plan``: the ingress's routing plan; the request router read it to pick this replica.
        destinations = decode_offers(offers)
        warmup = is_warmup(request.request_id)  # a decode replica's start-up request
        ipc = self.engine.senders.get(CUDA_IPC)
        # A decode pool on another node sends its export too: its handles open only there.
        if cuda_ipc is not None and ipc is not None and ipc.on_this_node(destinations):
            ipc.register(cuda_ipc)  # maps only the first time this endpoint is seen
            if self._sp_group is not None:
                await asyncio.to_thread(self._sp_group.register, cuda_ipc)  # on every rank
        await asyncio.to_thread(self.engine.check_capacity)
        n = request.num_prompt_tokens
        self._queued_tokens += n
        self._num_running += 1
        self._queue.add(request.request_id, n, time.time())
        self._metrics.prefill_queue_tokens.set(self._queued_tokens)
        try:
            async for event in run_prefill(self.engine, request, destinations,
                                           executor=self._executor, eos_token_ids=self._eos,
                                           around=None if warmup else self._profile):
                if isinstance(event, FirstToken):
                    self._queue.done(request.request_id, time.time())
                    self._queued_tokens -= n
                    n = 0
                    self._metrics.prefill_queue_tokens.set(self._queued_tokens)
                    if not warmup:
                        self._record(request.num_prompt_tokens, event.prefill_s)
                yield event
            if warmup:
                self._num_warmups += 1
            else:
                self._num_prefills += 1
        finally:
            self._queue.done(request.request_id, time.time())
            self._queued_tokens -= n
            self._num_running -= 1
            self._metrics.prefill_queue_tokens.set(self._queued_tokens)

    def _record(self, num_tokens: int, prefill_s: float) -> None:
        """A served prefill's time, for the metrics and the routers' measured costs."""
        self._metrics.ttft_stage.observe(prefill_s, tags={"stage": "prefill"})
        seq = self._measured[-1][0] + 1 if self._measured else 1
        self._measured.append((seq, num_tokens, prefill_s))

    async def stats(self) -> PrefillStats:
        num_leases, leased_bytes = await asyncio.to_thread(self.engine.leased)
        self._metrics.kv_leases_active.set(num_leases)
        return PrefillStats(num_leases, leased_bytes, self._num_prefills, self._num_running,
                            self._num_warmups)

    async def record_routing_stats(self) -> dict:
        """Serve's routing-stats hook: this replica's queue for the routers (on the event
        loop, where the queue is kept: no lock, no wait behind the prefill worker)."""
        return prefill_report(self._queue, time.time(), self._measured)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: seconds of queued prefill, the router's signal."""
        return {"load": queue_seconds(self._queue.items(), time.time(), self._cost,
                                      sp=self._sp, triangle_fraction=self._triangle_fraction)}

    async def check_health(self) -> None:
        if self._sp_group is not None:  # a dead rank or a failed collective: replace us
            await asyncio.to_thread(self._sp_group.check_health)
        await self.stats()  # also expires stale leases

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is None:  # the constructor failed
            return
        if self._sp_group is not None:
            self._sp_group.shutdown()  # its rank actors would die with us; do not wait for it
            engine = self._sp_group.engine  # rank 0's own senders and leases
        try:
            num_leases, leased_bytes = engine.leased()
        except Exception as e:  # noqa: BLE001 (best effort at exit: the keeper may be gone)
            logger.warning("PrefillServer stopping; lease count unavailable: %r", e)
            return
        for sender in engine.senders.values():
            sender.close()
        logger.info("PrefillServer stopping: %d KV leases outstanding (%d bytes), %d prefills "
                    "served", num_leases, leased_bytes, self._num_prefills)
