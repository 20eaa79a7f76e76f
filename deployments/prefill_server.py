"""PrefillServer: a Serve deployment wrapping the prefill engine.

Life of a request here:
1. ``prefill(request)`` is called by the decode replica that reserved the request's blocks.
2. The prompt runs on a single worker thread (one prefill at a time per replica; the event
   loop stays free for lease releases and health checks).
3. Token 0 and a ``KVHandle`` go back; the KV waits in the Ray object store under a lease
   until the decode side pulls and releases it, or the lease expires.
Un-pulled KV over the budget makes ``prefill`` answer 503 (``PrefillBusyError``).
On shutdown Serve first lets in-flight ``prefill`` calls finish; ``__del__`` then logs the
leases still held, which die with this replica (the lease keeper shares its fate).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from deployments.config import AppConfig
from deployments.messages import PrefillStats
from deployments.metrics import Metrics
from deployments.runtime import load_replica_model, trianglemix_config
from disagg.prefill.engine import PrefillConfig, PrefillEngine, PublishedPrefill
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.ray_object_store import RayObjectStoreKVSender

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
        self._num_prefills = 0
        self.engine = PrefillEngine(
            loaded.model, model_name=config.model_name,
            trianglemix=trianglemix_config(config, loaded.config),
            sender=RayObjectStoreKVSender(),
            config=PrefillConfig(lease_s=settings.lease_s,
                                 max_leased_bytes=int(settings.max_leased_gib * _GIB)),
        )
        # Ready only after a warm-up prefill (first-call costs stay out of served requests).
        warmup = EngineRequest("warmup", (1, 2, 3, 4), SamplingParams(temperature=0.0), 1, 0)
        self.engine.prefill(warmup)

    async def prefill(self, request: EngineRequest) -> PublishedPrefill:
        self._queued_tokens += request.num_prompt_tokens
        self._metrics.prefill_queue_tokens.set(self._queued_tokens)
        try:
            loop = asyncio.get_running_loop()
            published = await loop.run_in_executor(
                self._executor, self.engine.prefill_and_publish, request, self._eos)
        finally:
            self._queued_tokens -= request.num_prompt_tokens
            self._metrics.prefill_queue_tokens.set(self._queued_tokens)
        self._num_prefills += 1
        self._metrics.ttft_stage.observe(published.prefill_s, tags={"stage": "prefill"})
        return published

    async def stats(self) -> PrefillStats:
        sender = self.engine.sender
        num_leases, leased_bytes = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: (sender.num_leases, sender.leased_bytes))
        self._metrics.kv_leases_active.set(num_leases)
        return PrefillStats(num_leases, leased_bytes, self._num_prefills)

    async def check_health(self) -> None:
        await self.stats()  # also expires stale leases

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is None:  # the constructor failed
            return
        try:
            num_leases, leased_bytes = engine.sender.num_leases, engine.sender.leased_bytes
        except Exception as e:  # noqa: BLE001 (best effort at exit: the keeper may be gone)
            logger.warning("PrefillServer stopping; lease count unavailable: %r", e)
            return
        logger.info("PrefillServer stopping: %d KV leases outstanding (%d bytes), %d prefills "
                    "served", num_leases, leased_bytes, self._num_prefills)
