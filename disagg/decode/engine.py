"""The decode engine: paged dense decode with continuous batching, for local and remote KV.

Life of a request in it:
1. ``add_request`` (short prompt: decode prefills it itself, densely) or
   ``add_remote_request`` (long prompt: blocks for its KV are reserved now; WAITING_FOR_REMOTE_KV).
2. Remote only: ``kv_ready`` brings token 0 (sampled by prefill, delivered by the caller,
   counted here but not emitted again) and the KV's handle and fingerprint. A mismatched
   fingerprint raises ``KVMismatchError``; a token 0 that ends the request ends it now and
   releases the lease; otherwise the pull starts and ``step`` polls it.
3. ``step``: schedule -> one forward for every running sequence and admitted prefill ->
   sample and update. Returns a ``TokenOutput`` per new token and per end.
4. The request ends on a stop id, EOS, max_tokens, a failed or mismatched pull (finish reason
   "error" with the typed error), or ``abort``; its blocks return to the pool on every path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from disagg.decode.config import DecodeConfig
from disagg.decode.kv_arrival import KVArrivalTracker, KVExpectation
from disagg.decode.request import TokenOutput
from disagg.decode.runner import ModelRunner
from disagg.decode.scheduler import Scheduler
from disagg.kv.block_pool import BlockPool, BlockTable
from disagg.kv.layout import KVFingerprint, KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.llama import LlamaForCausalLM
from disagg.request import EngineRequest
from disagg.sampling import SampledToken
from disagg.transport.base import KVHandle, KVReceiver


class DecodeEngine:
    """Serves many requests at once from one paged KV pool."""

    def __init__(self, model: LlamaForCausalLM, config: DecodeConfig, *, model_name: str,
                 receiver: KVReceiver | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.layout = KVLayout.of_model(model)
        device = next(model.parameters()).device
        num_blocks = config.resolve_num_blocks(self.layout)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = PagedKVCache(self.layout, num_blocks, config.block_size, device)
        self.receiver = receiver
        arrivals = KVArrivalTracker(
            receiver, self.pool, self.cache, KVExpectation(model_name, self.layout),
            pull_timeout_s=config.kv_pull_timeout_s,
            remote_timeout_s=config.remote_kv_timeout_s, clock=clock)
        eos = model.config.eos_token_ids if config.eos_token_ids is None else config.eos_token_ids
        self.scheduler = Scheduler(config, self.pool, arrivals, tuple(eos))
        self.runner = ModelRunner(model, self.cache, max_num_seqs=config.max_num_seqs)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request whose prompt this engine prefills itself."""
        self.scheduler.add(request)

    def add_remote_request(self, request: EngineRequest) -> None:
        """Reserve blocks for a request whose KV a prefill engine will produce."""
        if self.receiver is None:
            raise ValueError("this decode engine has no KV receiver: it cannot take remote KV")
        self.scheduler.add_remote(request)

    def kv_ready(self, request_id: str, handle: KVHandle, first_token: SampledToken,
                 fingerprint: KVFingerprint) -> None:
        """Prefill finished ``request_id``: check its fingerprint, count token 0, pull its KV."""
        self.scheduler.kv_ready(request_id, handle, first_token, fingerprint)

    def abort(self, request_id: str) -> None:
        """End a request in any state (no output follows); unknown ids are ignored."""
        self.scheduler.abort(request_id)

    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        sampled = self.runner.execute(batch) if batch.sequences else {}
        return self.scheduler.update(batch, sampled)

    def has_unfinished(self) -> bool:
        """Requests in the engine, or ends not yet reported by ``step``."""
        return self.scheduler.has_unfinished()

    def block_table(self, request_id: str) -> BlockTable | None:
        """The blocks an unfinished request holds (for inspection and tests)."""
        return self.scheduler.block_table(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

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
        """Compile the decode kernels and capture the CUDA graphs of every decode batch size
        (nothing to do on CPU). Call once, before the engine takes requests: the first
        request then pays no compilation."""
        self.runner.capture_graphs()
