"""The decode engine: paged dense decode with continuous batching, for local and remote KV.

Life of a request in it:
1. ``add_request`` (short prompt: decode prefills it itself, densely) or
   ``add_remote_request`` (long prompt: blocks for its KV are reserved now; WAITING_FOR_REMOTE_KV).
2. Remote only: once its blocks are reserved, ``destination`` names where prefill writes its
   KV (prefill must not start before). ``kv_complete`` brings token 0 (sampled by prefill,
   delivered by the caller, counted here but not emitted again) and prefill's completion
   record. A mismatched fingerprint raises ``KVMismatchError``; a token 0 that ends the request
   ends it now; otherwise ``step`` polls the receiver until every layer is confirmed.
   ``writer_done`` tells the engine that the prefill call ended (rows of an aborted request
   are fenced until then, or until their destination expires).
3. ``step``: schedule -> one forward for every running sequence and admitted prefill ->
   sample and update. Returns a ``TokenOutput`` per new token and per end. With
   ``async_scheduling`` a step queues its forward and returns; the next step queues the one
   after it (``Scheduler.continue_decode``) before it reads this one's tokens, so a token is
   reported one step after its forward was queued, and the host's work hides behind the
   device's. Blocks of a request that ends while a forward is in flight are held until it
   lands; ``abort`` lands the forward in flight first, so an aborted request's blocks are free
   when it returns.
4. The request ends on a stop id, EOS, max_tokens, a failed or mismatched pull (finish reason
   "error" with the typed error), or ``abort``; its blocks return to the pool on every path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from disagg.decode.config import DecodeConfig
from disagg.decode.kv_arrival import KVArrivalTracker, KVExpectation
from disagg.decode.request import TokenOutput
from disagg.decode.runner import ModelRunner, PendingForward
from disagg.decode.scheduler import Scheduler, SchedulerOutput
from disagg.kv.block_pool import BlockPool, BlockTable
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.llama import LlamaForCausalLM
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.base import KVCompletion, KVDestination, KVReceiver
from disagg.transport.receivers import ReceiverSet


class DecodeEngine:
    """Serves many requests at once from one paged KV pool."""

    def __init__(self, model: LlamaForCausalLM, config: DecodeConfig, *, model_name: str,
                 receivers: tuple[KVReceiver, ...] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.layout = KVLayout.of_model(model)
        device = next(model.parameters()).device
        num_blocks = config.resolve_num_blocks(self.layout)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = PagedKVCache(self.layout, num_blocks, config.block_size, device)
        self.receivers = ReceiverSet(receivers) if receivers else None
        if self.receivers is not None:
            self.receivers.attach(self.cache)
        arrivals = KVArrivalTracker(
            self.receivers, self.pool, KVExpectation(model_name, self.layout),
            remote_timeout_s=config.remote_kv_timeout_s, clock=clock)
        self.arrivals = arrivals
        eos = model.config.eos_token_ids if config.eos_token_ids is None else config.eos_token_ids
        self.scheduler = Scheduler(config, self.pool, arrivals, tuple(eos))
        self.runner = ModelRunner(model, self.cache, max_num_seqs=config.max_num_seqs)
        self.async_scheduling = (device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._pending: PendingForward | None = None  # launched, not yet landed
        self._fences = 0
        self._landed: list[TokenOutput] = []  # landed by ``abort``, reported by ``step``
        self.num_overlapped_steps = 0  # forwards queued while the one before was in flight

    def add_request(self, request: EngineRequest, generated: tuple[int, ...] = ()) -> None:
        """Queue a request whose prompt this engine prefills itself. ``generated``: tokens
        already sent to the client (token 0 of a hand-off that failed), computed with the
        prompt and counted as generated, so sampling and limits go on where they were."""
        self.scheduler.add(request, generated)

    def add_remote_request(self, request: EngineRequest) -> None:
        """Reserve blocks for a request whose KV a prefill engine will produce."""
        if self.receivers is None:
            raise ValueError("this decode engine has no KV receiver: it cannot take remote KV")
        self.scheduler.add_remote(request)

    def destinations(self, request_id: str) -> tuple[KVDestination, ...]:
        """Where prefill may write ``request_id``'s KV, one offer per receiver in order of
        preference; empty until its blocks are reserved (or once it no longer waits)."""
        return self.scheduler.destinations(request_id)

    def kv_complete(self, request_id: str, first_token: SampledToken,
                    completion: KVCompletion) -> None:
        """Prefill wrote every layer: check the record, count token 0, finish receiving."""
        self.scheduler.kv_complete(request_id, first_token, completion)

    def writer_done(self, request_id: str) -> None:
        """The prefill call of ``request_id`` ended: fenced rows of it may return to the pool."""
        self.scheduler.writer_done(request_id)

    def abort(self, request_id: str, *, fence_grace_s: float | None = None) -> None:
        """End a request in any state (no output follows); unknown ids are ignored.
        ``fence_grace_s``: its prefill was cancelled while it may still write; its rows stay
        fenced that long at most (else until ``writer_done`` or its destination's expiry)."""
        if self._pending is not None and request_id in self.scheduler.requests:
            # Land the forward in flight first (its outputs go out with the next step), so
            # the request's blocks are free when abort returns, as without overlap.
            pending, self._pending = self._pending, None
            self._landed += self.scheduler.update(pending.batch, self._land(pending))
        self._landed = [o for o in self._landed if o.request_id != request_id]
        self.scheduler.abort(request_id, fence_grace_s=fence_grace_s)

    def step(self) -> list[TokenOutput]:
        outputs, self._landed = self._landed, []
        pending, self._pending = self._pending, None
        if pending is not None:
            follow = self.scheduler.continue_decode(pending.batch)
            if follow is not None:
                self._pending = self._launch(follow, pending)
                self.num_overlapped_steps += 1
            outputs += self.scheduler.update(pending.batch, self._land(pending))
            if self._pending is not None:
                return outputs
        batch = self.scheduler.schedule()
        if self.async_scheduling and batch.sequences:
            self._pending = self._launch(batch, None)
            return outputs + self.scheduler.update(SchedulerOutput(()), {})  # ends decided
        sampled = self.runner.execute(batch) if batch.sequences else {}
        return outputs + self.scheduler.update(batch, sampled)

    def _launch(self, batch: SchedulerOutput, previous: PendingForward | None
                ) -> PendingForward:
        self._fences += 1
        self.pool.hold_frees_until(self._fences)  # its rows may be written until it lands
        try:
            return replace(self.runner.launch(batch, previous), fence=self._fences)
        except BaseException:
            self.pool.hold_frees_until(None if previous is None else previous.fence)
            raise

    def _land(self, pending: PendingForward) -> dict[str, SampledToken]:
        sampled = self.runner.land(pending)  # the device is past this forward
        self.pool.release_held(pending.fence)
        if self._pending is None:
            self.pool.hold_frees_until(None)
        return sampled

    def has_unfinished(self) -> bool:
        """Requests in the engine, a forward in flight, or ends not yet reported by ``step``."""
        return self._pending is not None or bool(self._landed) \
            or self.scheduler.has_unfinished()

    def block_table(self, request_id: str) -> BlockTable | None:
        """The blocks an unfinished request holds (for inspection and tests)."""
        return self.scheduler.block_table(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_fenced_blocks(self) -> int:
        """Blocks of ended requests held until no prefill writer can touch them."""
        return self.arrivals.num_fenced_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_total_blocks

    @property
    def num_forwards(self) -> int:
        return self.runner.num_forwards

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def warm_up(self) -> None:
        """Compile the decode kernels, pick the dense kernel of local prompt chunks by
        measurement and capture the CUDA graphs of every decode batch size (nothing to do on
        CPU). Call once, before the engine takes requests: the first request then pays no
        compilation."""
        self.runner.warm_up(self.config.max_num_batched_tokens)
