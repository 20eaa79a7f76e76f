"""DecodeServer: a Serve deployment wrapping the decode engine; it drives disaggregation.

The engine runs on its own thread (``EngineLoop``); this replica talks to it through a
``DecodeLoopClient``.

Life of a request here (``generate``):
- local path: the engine prefills the prompt itself (dense) and streams tokens.
- disaggregated path: ``serve_disaggregated`` (``disagg/disaggregated.py``) -- reserve blocks
  and offer KV destinations (cuda_ipc / nccl / object store, in the configured order), call
  the prefill deployment (streaming): token 0 goes to the ingress the moment it arrives, the
  KV completion record follows, then tokens 1.. stream from the engine. The last item carries
  the request's timing breakdown.
  If the prefill deployment cannot take the call (its replicas died, or are gone because the
  app is being deleted or drained), the reservation is dropped and this replica prefills the
  prompt itself: the request is served on the local path instead of failing.
Every exit (finish, error, client gone: Serve cancels this generator) ends the request in the
engine, which frees its blocks (or fences them while a prefill writer may still write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import DEFAULT_POOL, AppConfig
from deployments.failures import REPLICA_GONE
from deployments.kv_transports import build_receivers
from deployments.load import decode_report
from deployments.messages import WARMUP_PREFIX, DecodeStats, StreamItem
from deployments.metrics import Metrics
from deployments.runtime import load_replica_model, replica_device
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.loop_client import DecodeLoopClient
from disagg.decode.request import TokenOutput
from disagg.disaggregated import (
    HandoffConfig,
    HandoffTiming,
    PrefillEvent,
    PrefillUnavailableError,
    serve_disaggregated,
)
from disagg.engine_loop import EngineLoop
from disagg.errors import DisaggError, KVPoolMemoryError, KVTransferError
from disagg.openai.errors import APIError, from_exception
from disagg.prefill.engine import PrefillBusyError
from disagg.request import EngineRequest
from disagg.routing import DISAGGREGATED, LOCAL, ReplicaQueue, RoutePlan  # noqa: F401 (paths)
from disagg.sampling import SamplingParams
from disagg.transport.base import KVDestination, encode_offers
from disagg.transport.direct import CUDA_IPC

_GIB = 1 << 30
_HEARTBEAT_STALE_S = 30.0
logger = logging.getLogger("ray.serve")  # Serve writes it to this replica's log file


class ServePrefillClient:
    """The prefill deployment as a ``PrefillClient``: one streaming call per request."""

    def __init__(self, handle: DeploymentHandle, export=None, plan: RoutePlan | None = None):
        self._handle = handle
        self._export = export  # this pool's cuda_ipc handles (mapped once per prefill replica)
        self._plan = plan  # the ingress's plan: its request router sends the call where it says

    async def prefill(self, request: EngineRequest, offers: tuple[KVDestination, ...]
                      ) -> AsyncIterator[PrefillEvent]:
        stream = self._handle.options(stream=True).prefill.remote(
            request, encode_offers(offers), self._export, self._plan)
        finished = False
        try:
            try:
                first = await stream.__anext__()
            except REPLICA_GONE as e:
                raise PrefillUnavailableError(f"no prefill replica could take the call: "
                                              f"{e!r}") from e
            yield first
            try:
                async for event in stream:
                    yield event
            except REPLICA_GONE as e:  # it died mid-transfer: its writes stopped with it
                raise KVTransferError(f"the prefill replica of {request.request_id!r} was lost "
                                      f"before its KV was complete: {e!r}") from e
            finished = True
        finally:
            if not finished:
                stream.cancel()  # the prefill worker stops at its next layer


@serve.deployment
class DecodeServer:
    async def __init__(self, config: AppConfig, prefill: DeploymentHandle):
        settings = config.decode
        loaded = load_replica_model(config, num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
        self._metrics = Metrics()
        self._handoff = HandoffConfig(kv_complete_timeout_s=settings.remote_kv_timeout_s,
                                      first_token_timeout_s=settings.remote_kv_timeout_s,
                                      cancel_grace_s=settings.cancel_grace_s,
                                      on_kv_failure=settings.on_kv_failure)
        receivers = build_receivers(config, replica_device(config, settings.num_gpus))
        try:
            engine = DecodeEngine(
                loaded.model,
                DecodeConfig(block_size=settings.block_size,
                             kv_cache_bytes=int(settings.kv_cache_gib * _GIB),
                             max_num_seqs=settings.max_num_seqs,
                             max_num_batched_tokens=max(2048, settings.max_num_seqs),
                             remote_kv_timeout_s=settings.remote_kv_timeout_s,
                             async_scheduling=settings.async_scheduling),
                model_name=config.model_name, receivers=receivers)
        except KVPoolMemoryError as e:  # name the setting: the user's fix
            raise KVPoolMemoryError(
                f"decode.kv_cache_gib = {settings.kv_cache_gib:g}: {e}. Lower decode.kv_cache_gib"
                " (a GPU shared with prefill also holds its weights and its warm-up's "
                "activations)") from e
        engine.warm_up()  # decode kernels compiled, CUDA graphs captured
        ipc = engine.receivers.receivers.get(CUDA_IPC)
        self._pools = prefill if isinstance(prefill, dict) else {DEFAULT_POOL: prefill}
        self._ipc_export = ipc.export() if ipc is not None else None
        self._prefill = ServePrefillClient(next(iter(self._pools.values())), self._ipc_export)
        self._settings = settings
        # What the routers see of this replica (routing stats), kept on the event loop.
        self._active: set[str] = set()
        self._plans: dict[str, RoutePlan] = {}  # the ingress's plans of requests held here
        self._local_queue = ReplicaQueue()
        self._loop = EngineLoop(engine, asyncio.get_running_loop())
        self._loop.start()
        self._engine = DecodeLoopClient(self._loop)
        await self._warm_up()
        for name, handle in self._pools.items():
            await handle.stats.remote()  # set up the route to prefill before serving
            await self._warm_up_remote(name)

    async def _warm_up(self) -> None:
        request = EngineRequest(f"{WARMUP_PREFIX}local", (1, 2, 3, 4),
                                SamplingParams(temperature=0.0), 2, 0)
        async for _ in self._run_local(request):
            pass

    async def _warm_up_remote(self, pool: str) -> None:
        """One short request through the disaggregated path of prefill pool ``pool`` before
        this replica is ready: the prefill replica it reaches maps this pool's cuda_ipc handles
        and writes into them once, and the streaming route to it exists, so the first long
        request pays none of that (on one H200 the first 32K request's extra TTFT over the
        second fell from 125 ms to 11-19 ms). Best effort: a prefill pool that cannot serve
        yet is logged, and requests fall back as they would anyway."""
        request = EngineRequest(f"{WARMUP_PREFIX}{pool}", tuple(range(1, 17)),
                                SamplingParams(temperature=0.0), 2, 0)
        prefill = ServePrefillClient(self._pools[pool], self._ipc_export)
        t0 = time.perf_counter()

        async def run() -> None:
            async for out in serve_disaggregated(request, prefill, self._engine,
                                                 HandoffTiming(), self._handoff):
                if out.error is not None:
                    raise out.error

        try:
            await asyncio.wait_for(run(), self._settings.remote_kv_timeout_s)
            logger.info("DecodeServer: disaggregated warm-up through pool %r in %.2f s", pool,
                        time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 (best effort: serving does not depend on it)
            logger.warning("DecodeServer: disaggregated warm-up through pool %r failed: %r",
                           pool, e)

    async def generate(self, request: EngineRequest, path: str, plan: RoutePlan | None = None
                       ) -> AsyncIterator[StreamItem]:
        """Stream a request's tokens; errors become a final ``StreamItem`` with ``error``.
        ``plan``: the ingress's routing plan (prefill pool and replica of a remote prefill)."""
        rid = request.request_id
        self._active.add(rid)
        try:
            if path == LOCAL:
                self._local_queue.add(rid, request.num_prompt_tokens, time.time())
                async for item in self._run_local(request):
                    self._local_queue.done(rid, time.time())
                    yield item
                return
            try:
                self._plans[rid] = plan
                async for item in self._run_disaggregated(request):
                    yield item
            except PrefillUnavailableError as e:  # raised before anything was yielded
                logger.warning("prefill unavailable (%s): request %s is prefilled here", e,
                               request.request_id)
                self._metrics.prefill_fallbacks.inc()
                async for item in self._run_local(request):
                    yield item
        except PrefillBusyError as e:  # un-pulled KV over its budget: overload, not an outage
            yield StreamItem(finished=True, finish_reason="error",
                             error=APIError(429, str(e), "rate_limit_error", None,
                                            "kv_leases_full", retry_after_s=1))
        except DisaggError as e:
            yield StreamItem(finished=True, finish_reason="error", error=from_exception(e))
        finally:
            self._active.discard(rid)
            self._plans.pop(rid, None)
            self._local_queue.done(rid, time.time())

    async def _run_local(self, request: EngineRequest) -> AsyncIterator[StreamItem]:
        try:
            await self._engine.add_local(request)
            async for out in self._engine.outputs(request.request_id):
                yield _item(out)
        finally:
            self._engine.abort(request.request_id)

    async def _run_disaggregated(self, request: EngineRequest) -> AsyncIterator[StreamItem]:
        timing = HandoffTiming()
        prefill = self._prefill
        plan = self._plans.get(request.request_id)
        if plan is not None and plan.prefill_pool in self._pools:
            prefill = ServePrefillClient(self._pools[plan.prefill_pool], self._ipc_export, plan)
        async for out in serve_disaggregated(request, prefill, self._engine, timing,
                                             self._handoff):
            if out.finished:
                self._observe(timing)
            yield _item(out, timing.to_dict() if out.finished else None)

    def _observe(self, timing: HandoffTiming) -> None:
        stages = {"queue": timing.queue_s, "prefill": timing.prefill_s,
                  "transfer": timing.transfer_s, "first_decode": timing.first_decode_s}
        for stage, seconds in stages.items():
            if seconds is not None:
                self._metrics.ttft_stage.observe(seconds, tags={"stage": stage})
        if timing.backend is not None and timing.transfer_s is not None:
            self._metrics.kv_transfer_bytes.inc(timing.kv_bytes, tags={"backend": timing.backend})
            self._metrics.kv_transfer_seconds.observe(timing.transfer_s,
                                                      tags={"backend": timing.backend})

    async def stats(self) -> DecodeStats:
        def read(engine: DecodeEngine) -> DecodeStats:
            return DecodeStats(engine.num_free_blocks, engine.num_total_blocks,
                               engine.has_unfinished(), engine.num_forwards,
                               engine.num_fenced_blocks)

        stats = await self._loop.call(read)
        self._metrics.kv_blocks_free.set(stats.num_free_blocks)
        return stats

    async def record_routing_stats(self) -> dict:
        """Serve's routing-stats hook: KV blocks, requests held, local prefills queued. Read
        without the engine thread (an int read of the pool), so it never waits behind a step."""
        engine = self._loop.engine
        return decode_report(now=time.time(), num_free_blocks=engine.num_free_blocks,
                             num_total_blocks=engine.num_total_blocks,
                             block_size=self._settings.block_size,
                             max_num_seqs=self._settings.max_num_seqs,
                             active_ids=sorted(self._active), local_queue=self._local_queue)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: the share of KV blocks or sequence slots in use, whichever
        is fuller (what the router places decode by)."""
        engine = self._loop.engine
        used = 1.0 - engine.num_free_blocks / max(1, engine.num_total_blocks)
        return {"load": max(used, len(self._active) / self._settings.max_num_seqs)}

    async def check_health(self) -> None:
        # The loop's heartbeat, not a call into the engine thread: a long prefill step there
        # must not fail the health check of a healthy replica.
        if not self._loop.alive:
            raise RuntimeError(f"engine loop is not running: {self._loop.error!r}")
        if time.monotonic() - self._loop.heartbeat > _HEARTBEAT_STALE_S:
            raise RuntimeError("engine loop heartbeat is stale")
        self._metrics.kv_blocks_free.set(self._loop.engine.num_free_blocks)

    def __del__(self):
        # Serve calls this once in-flight requests have ended (or the drain timed out).
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        loop.stop(timeout_s=5.0)
        engine = loop.engine  # the engine thread is gone: read it directly
        if engine.receivers is not None:
            engine.receivers.close()
        logger.info("DecodeServer stopping: %d/%d KV blocks free, unfinished requests: %s",
                    engine.num_free_blocks, engine.num_total_blocks, engine.has_unfinished())


def _item(out: TokenOutput, timing: dict | None = None) -> StreamItem:
    error = from_exception(out.error) if out.error is not None else None
    return StreamItem(token=out.token, finished=out.finished, finish_reason=out.finish_reason,
                      error=error, timing=timing)
