"""DecodeServer: a Serve deployment wrapping the decode engine and driving disaggregation.

The engine runs on its own thread (``EngineLoop``); this replica's methods talk to it.

Life of a request here (``generate``):
- local path: ``add_request``; decode prefills the prompt itself (dense) and streams tokens.
- disaggregated path:
  1. ROUTED: ``add_remote_request`` reserves the prompt's blocks in this replica's pool;
  2. PREFILLING: this replica calls the prefill deployment; token 0 comes back with a KV
     handle and is streamed to the ingress at once (before any KV moves);
  3. KV_TRANSFERRING: ``kv_ready`` checks the fingerprint and starts the pull from the Ray
     object store; the engine loop polls it;
  4. DECODING: tokens 1.. stream until the request finishes.
  If the prefill deployment cannot take the call (its replicas died, or are gone because the
  app is being deleted or drained), the reservation is dropped and this replica prefills the
  prompt itself: the request is served on the local path instead of failing.
Every exit (finish, error, client gone: Serve cancels this generator) aborts the request in
the engine, which frees its blocks and releases the prefill lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.failures import REPLICA_GONE
from deployments.messages import DecodeStats, StreamItem
from deployments.metrics import Metrics
from deployments.runtime import load_replica_model
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.engine_loop import EngineLoop, EngineLoopStopped
from disagg.errors import DisaggError
from disagg.openai.errors import APIError, from_exception
from disagg.prefill.engine import PrefillBusyError
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.ray_object_store import BACKEND, RayObjectStoreKVReceiver

LOCAL, DISAGGREGATED = "local", "disaggregated"
_GIB = 1 << 30
_HEARTBEAT_STALE_S = 30.0
logger = logging.getLogger("ray.serve")  # Serve writes it to this replica's log file


class _PrefillUnavailable(Exception):
    """The prefill call failed before token 0: the request can still be prefilled here."""


@serve.deployment
class DecodeServer:
    async def __init__(self, config: AppConfig, prefill: DeploymentHandle):
        settings = config.decode
        loaded = load_replica_model(config, num_cpus=settings.num_cpus, num_gpus=settings.num_gpus)
        self._prefill = prefill
        self._metrics = Metrics()
        engine = DecodeEngine(
            loaded.model,
            DecodeConfig(block_size=settings.block_size,
                         kv_cache_bytes=int(settings.kv_cache_gib * _GIB),
                         max_num_seqs=settings.max_num_seqs,
                         max_num_batched_tokens=max(2048, settings.max_num_seqs),
                         kv_pull_timeout_s=settings.kv_pull_timeout_s),
            model_name=config.model_name, receiver=RayObjectStoreKVReceiver())
        self._loop = EngineLoop(engine, asyncio.get_running_loop())
        self._loop.start()
        await self._warm_up()
        await self._prefill.stats.remote()  # set up the route to prefill before serving

    async def _warm_up(self) -> None:
        request = EngineRequest("warmup", (1, 2, 3, 4), SamplingParams(temperature=0.0), 2, 0)
        async for _ in self._run_local(request):
            pass

    async def generate(self, request: EngineRequest, path: str) -> AsyncIterator[StreamItem]:
        """Stream a request's tokens; errors become a final ``StreamItem`` with ``error``."""
        try:
            runner = self._run_local if path == LOCAL else self._run_disaggregated
            try:
                async for item in runner(request):
                    yield item
            except _PrefillUnavailable as e:  # raised before anything was yielded
                logger.warning("prefill unavailable (%r): request %s is prefilled here",
                               e.__cause__, request.request_id)
                self._metrics.prefill_fallbacks.inc()
                async for item in self._run_local(request):
                    yield item
        except PrefillBusyError as e:
            yield StreamItem(finished=True, finish_reason="error",
                             error=APIError(503, str(e), "server_error", None, "overloaded",
                                            retry_after_s=1))
        except DisaggError as e:
            yield StreamItem(finished=True, finish_reason="error", error=from_exception(e))

    async def _run_local(self, request: EngineRequest) -> AsyncIterator[StreamItem]:
        stream = self._loop.open_stream(request.request_id)
        try:
            await self._loop.call(lambda engine: engine.add_request(request))
            async for item in self._drain(stream):
                yield item
        finally:
            self._end(request.request_id)

    async def _run_disaggregated(self, request: EngineRequest) -> AsyncIterator[StreamItem]:
        rid = request.request_id
        stream = self._loop.open_stream(rid)
        try:
            await self._loop.call(lambda engine: engine.add_remote_request(request))
            try:
                published = await self._prefill.prefill.remote(request)
            except REPLICA_GONE as e:
                raise _PrefillUnavailable() from e
            yield StreamItem(token=published.first_token,
                             finished=published.finish_reason is not None,
                             finish_reason=published.finish_reason,
                             prefill_s=published.prefill_s)
            if published.handle is None:
                return
            t0 = time.perf_counter()
            await self._loop.call(lambda engine: engine.kv_ready(
                rid, published.handle, published.first_token, published.fingerprint))
            first = True
            async for item in self._drain(stream):
                if first:  # KV transfer + first decode step
                    first = False
                    elapsed = time.perf_counter() - t0
                    self._metrics.ttft_stage.observe(elapsed, tags={"stage": "transfer"})
                    self._metrics.kv_transfer_bytes.inc(published.handle.num_bytes,
                                                        tags={"backend": BACKEND})
                    self._metrics.kv_transfer_seconds.observe(elapsed, tags={"backend": BACKEND})
                yield item
        finally:
            self._end(rid)

    async def _drain(self, stream: asyncio.Queue) -> AsyncIterator[StreamItem]:
        while True:
            out = await stream.get()
            if isinstance(out, EngineLoopStopped):
                raise out
            error = from_exception(out.error) if out.error is not None else None
            yield StreamItem(token=out.token, finished=out.finished,
                             finish_reason=out.finish_reason, error=error)
            if out.finished:
                return

    def _end(self, request_id: str) -> None:
        # Idempotent: after a normal finish the engine has forgotten the id already.
        self._loop.close_stream(request_id)
        done = self._loop.call(lambda engine: engine.abort(request_id))
        done.add_done_callback(lambda f: f.exception())  # nobody awaits it: consume errors

    async def stats(self) -> DecodeStats:
        def read(engine: DecodeEngine) -> DecodeStats:
            return DecodeStats(engine.num_free_blocks, engine.num_total_blocks,
                               engine.has_unfinished(), engine.num_forwards)

        stats = await self._loop.call(read)
        self._metrics.kv_blocks_free.set(stats.num_free_blocks)
        return stats

    async def check_health(self) -> None:
        if not self._loop.alive:
            raise RuntimeError(f"engine loop is not running: {self._loop.error!r}")
        if time.monotonic() - self._loop.heartbeat > _HEARTBEAT_STALE_S:
            raise RuntimeError("engine loop heartbeat is stale")
        await self.stats()

    def __del__(self):
        # Serve calls this once in-flight requests have ended (or the drain timed out).
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        loop.stop(timeout_s=5.0)
        engine = loop.engine  # the engine thread is gone: read it directly
        logger.info("DecodeServer stopping: %d/%d KV blocks free, unfinished requests: %s",
                    engine.num_free_blocks, engine.num_total_blocks, engine.has_unfinished())
