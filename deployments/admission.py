"""Admission and planning at the ingress: every request gets a ``RoutePlan`` or a refusal
before any work is done.

1. ``Planner.plan``: the request's summary and this moment's ``LoadSnapshot`` (replica reports
   merged with the ingress's own plans in flight, ``deployments/router.py``) go to the pure
   policy ``disagg.routing.route``.
2. A ``Rejection`` becomes the API error at once: 429 with ``Retry-After`` (seconds until the
   first queue that could take it has drained enough, from the cost model), or 503 when no
   replica of a role is alive. Nothing was queued, reserved or prefilled for it.
3. An admitted request is counted on its queues (``Ticket``) until its first token (prefill)
   and its end (decode blocks); the ticket ends exactly once on every exit path.
4. The prefills the replicas measured (their reports' ``measured``) calibrate the fitted cost
   model's prefill to the machine as it runs now (``PrefillCalibration``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from deployments.config import DEFAULT_POOL, AppConfig
from deployments.load import LoadBook
from disagg import cost_defaults
from disagg.cost_model import CostModel, ModelShape, PrefillCalibration
from disagg.models.config import ModelConfig
from disagg.openai.errors import APIError
from disagg.request import EngineRequest
from disagg.routing import QueueBounds, Rejection, RequestSummary, RoutePlan, RoutingSettings, route

DECODE_DEPLOYMENT = "DecodeServer"
logger = logging.getLogger("ray.serve")


def prefill_deployment(pool: str) -> str:
    """The Serve deployment of a prefill pool (the default pool keeps the plain name)."""
    return "PrefillServer" if pool == DEFAULT_POOL else f"PrefillServer_{pool}"


def cost_model_for(config: AppConfig, model_config: ModelConfig) -> CostModel:
    """The fitted coefficients of the replicas' device, scaled to the served model (and, on
    CPU, to the torch threads a prefill replica runs)."""
    which = config.routing.cost_model
    if which == "auto":
        which = "gpu" if config.decode.num_gpus > 0 else "cpu"
    base = cost_defaults.gpu_default() if which == "gpu" else cost_defaults.cpu_default()
    threads = max(1, math.ceil(config.prefill.num_cpus)) if which == "cpu" else None
    return base.for_model(ModelShape.of(model_config), threads=threads)


def triangle_fraction(config: AppConfig, model_config: ModelConfig) -> float:
    """Share of the layers a prefill pool runs with Triangle attention."""
    from deployments.runtime import trianglemix_config

    tm = trianglemix_config(config, model_config)
    return 0.0 if tm is None else len(tm.triangle_layers) / model_config.num_layers


def routing_settings(config: AppConfig, model_config: ModelConfig) -> RoutingSettings:
    r = config.routing
    return RoutingSettings(
        mode=r.mode, local_max_tokens=config.local_prefill_max_tokens,
        max_queue_wait_s=r.max_queue_wait_s, max_decode_stall_s=r.max_decode_stall_s,
        sp_target_prefill_s=r.sp_target_prefill_s,
        prefill_bounds=QueueBounds(r.prefill_queue.max_queued_requests,
                                   r.prefill_queue.max_queued_tokens),
        decode_bounds=QueueBounds(r.decode_queue.max_queued_requests,
                                  r.decode_queue.max_queued_tokens),
        kv_bytes_per_token=ModelShape.of(model_config).kv_bytes_per_token,
        kv_backend=config.transports[0])


def rejection_error(rejection: Rejection) -> APIError:
    if rejection.status == 429:
        return APIError(429, rejection.message, "rate_limit_error", None, "queue_full",
                        retry_after_s=rejection.retry_after_s)
    return APIError(rejection.status, rejection.message, "server_error", None,
                    "service_unavailable", retry_after_s=rejection.retry_after_s)


class Ticket:
    """An admitted request's place on its queues; ends once, whichever way the request ends."""

    def __init__(self, book: LoadBook, plan: RoutePlan, request_id: str):
        self.plan = plan
        self._book = book
        self._request_id = request_id
        self._first = self._ended = False

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self._book.first_token(self.plan, self._request_id, time.time())

    def end(self) -> None:
        if not self._ended:
            self._ended = self._first = True
            self._book.ended(self.plan, self._request_id, time.time())


class Planner:
    def __init__(self, config: AppConfig, model_config: ModelConfig):
        self.fitted = cost_model_for(config, model_config)
        self.calibration = PrefillCalibration()
        self.settings = routing_settings(config, model_config)
        fraction = triangle_fraction(config, model_config)
        self._pools = {name: (prefill_deployment(name), settings.sp, fraction)
                       for name, settings in config.pools.items()}
        self.book = LoadBook(self._pools, DECODE_DEPLOYMENT,
                             max_age_s=config.routing.request_timeout_s)

    @property
    def cost(self) -> CostModel:
        """The fitted model, its prefill scaled by what served prefills measured."""
        return self.calibration.apply(self.fitted)

    def observe(self, pool: str, num_prompt_tokens: int, measured_s: float) -> None:
        """A served prefill's measured time against the fitted prediction for its pool."""
        if pool in self._pools:
            _, sp, fraction = self._pools[pool]
            self.calibration.observe(
                self.fitted.prefill_s(num_prompt_tokens, triangle_fraction=fraction, sp=sp),
                measured_s)

    def plan(self, request: EngineRequest, *, local: bool = False) -> Ticket | APIError:
        """The request's plan (counted on its queues from now on), or the error to answer;
        ``local`` forces decode's own prefill (the ingress's start-up requests)."""
        summary = RequestSummary(request.request_id, request.num_prompt_tokens,
                                 request.max_tokens)
        for pool, tokens, seconds in self.book.new_prefill_measurements():
            self.observe(pool, tokens, seconds)
        now = time.time()
        load = self.book.snapshot(now)
        settings = replace(self.settings, mode="local") if local else self.settings
        outcome = route(summary, load, self.cost, settings)
        if isinstance(outcome, Rejection):
            logger.debug("refused %s (%d tokens): %s; load %s", request.request_id,
                         request.num_prompt_tokens, outcome, load)
            return rejection_error(outcome)
        self.book.planned(outcome, request.request_id, request.num_prompt_tokens,
                          request.max_tokens, now)
        return Ticket(self.book, outcome, request.request_id)
