"""The decode scheduler: which tokens of which requests go into the next forward.

Life of one step here:
1. ``schedule``: poll remote pulls (arrived KV queues its request at the front; a failed pull
   ends its request with an error), then build one batch within ``max_num_batched_tokens``:
   a. every running sequence with one token to compute gets its decode row; when its next
      token needs a block the pool cannot give, the most recently admitted running sequence is
      preempted by recompute (blocks freed, requeued at the front with prompt + generated
      tokens, its seed and step count kept) until the block fits;
   b. running sequences still in their prompt get their next chunk;
   c. queued remote requests get their blocks reserved (FIFO);
   d. waiting requests are admitted in order while ``max_num_seqs`` and the pool allow, each
      with blocks for all its tokens.
2. The runner does one forward for the batch and samples where a sequence reached its end.
3. ``update``: append sampled tokens, finish requests on a stop id, EOS or max_tokens.
Overlapped steps (``DecodeEngine`` with ``async_scheduling``): while a pure-decode batch is in
flight, ``continue_decode`` makes the next one from it (every row one position on, its token a
placeholder the runner takes on the device from the batch in flight), so that the next forward
is queued before the host reads the current one's tokens. It declines whenever the batch would
change (a request to admit, a prompt chunk to run, a block that needs a preemption): the engine
then lands the batch in flight and schedules normally. A row whose request ended meanwhile is
dropped by ``update`` (its token is discarded; its blocks were held by the pool, not reused).
Every end of a request (finish, abort, error) goes through ``_finish``: blocks back to the
pool, lease released, output emitted (none for abort: the caller knows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from disagg.decode.config import DecodeConfig
from disagg.decode.kv_arrival import KVArrivalTracker
from disagg.decode.request import DecodeRequest, RequestStatus, TokenOutput
from disagg.errors import DisaggError, KVMismatchError, PoolCapacityError
from disagg.kv.block_pool import BlockPool, BlockTable, blocks_for
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, SamplingParams
from disagg.transport.base import KVCompletion, KVDestination

PLACEHOLDER_TOKEN = -1
"""The token id of a row whose token the previous forward is still sampling on the device."""


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's part of the next forward."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens to compute, at positions num_computed_tokens ..
    num_computed_tokens: int
    block_table: BlockTable
    sample_step: int | None  # generated-token index to sample after the last one; None: mid-prompt
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class SchedulerOutput:
    """The batch of one forward (empty when nothing can run)."""

    sequences: tuple[ScheduledSequence, ...]

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


class Scheduler:
    """Owns every unfinished request: waiting, running, and (through its tracker) remote."""

    def __init__(self, config: DecodeConfig, pool: BlockPool, arrivals: KVArrivalTracker,
                 eos_token_ids: tuple[int, ...]):
        self.config = config
        self.pool = pool
        self.arrivals = arrivals
        self.eos_token_ids = eos_token_ids
        self.requests: dict[str, DecodeRequest] = {}
        self.waiting: deque[DecodeRequest] = deque()
        self.running: list[DecodeRequest] = []  # in admission order
        self.num_preemptions = 0
        self._outputs: list[TokenOutput] = []  # ends decided between steps

    def has_unfinished(self) -> bool:
        """Requests, ends not yet reported, or fenced rows still to be freed."""
        return bool(self.requests) or bool(self._outputs) or bool(self.arrivals.num_fenced_blocks)

    def add(self, request: EngineRequest, generated: tuple[int, ...] = ()) -> None:
        self._check_new(request)
        req = DecodeRequest(request, RequestStatus.WAITING,
                            token_ids=[*request.prompt_token_ids, *generated])
        self.requests[request.request_id] = req
        self.waiting.append(req)

    def add_remote(self, request: EngineRequest) -> None:
        self._check_new(request)
        req = DecodeRequest(request, RequestStatus.WAITING_FOR_REMOTE_KV)
        self.requests[request.request_id] = req
        self.arrivals.add(req)

    def kv_complete(self, request_id: str, first_token: SampledToken,
                    completion: KVCompletion) -> None:
        req = self.requests.get(request_id)
        if req is None:  # aborted while prefill ran: free what the hand-off still holds
            self.arrivals.receivers.complete(completion)
            self.arrivals.receivers.release(request_id)
            self.arrivals.writer_done(request_id)
            return
        if req.status is not RequestStatus.WAITING_FOR_REMOTE_KV or req.kv_completed \
                or not req.offers:
            raise ValueError(f"request {request_id!r} is not waiting for remote KV")
        self.arrivals.complete(req, completion)
        header = completion.header
        req.kv_attention = header.fingerprint.attention
        error = self.arrivals.expectation.mismatch(request_id, header.fingerprint,
                                                   req.num_prompt_tokens)
        if error is None and (header.request_id != request_id
                              or header.first_token_id != first_token.token_id):
            error = KVMismatchError(
                f"KV completion for request {request_id!r} does not match it: record of "
                f"{header.request_id!r} with first token {header.first_token_id}, token 0 "
                f"delivered was {first_token.token_id}")
        if error is not None:
            self._finish(req, RequestStatus.FINISHED_ERROR, error)
            raise error
        # Token 0 was sampled by prefill and delivered by the caller: counted, not re-emitted.
        req.token_ids.append(first_token.token_id)
        status = req.finish_status_after(first_token.token_id, self.eos_token_ids)
        if status is not None:
            self._finish(req, status)

    def destinations(self, request_id: str) -> tuple[KVDestination, ...]:
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_REMOTE_KV:
            return ()
        return req.offers

    def writer_done(self, request_id: str) -> None:
        self.arrivals.writer_done(request_id)

    def abort(self, request_id: str, *, fence_grace_s: float | None = None) -> None:
        req = self.requests.get(request_id)
        if req is not None:
            if fence_grace_s is not None:
                self.arrivals.fence_for(req, fence_grace_s)
            self._finish(req, RequestStatus.FINISHED_ABORTED, emit=False)

    def block_table(self, request_id: str) -> BlockTable | None:
        req = self.requests.get(request_id)
        return None if req is None else req.block_table

    def schedule(self) -> SchedulerOutput:
        self._poll_remote()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        for req in list(self.running):  # a. decode rows, oldest first
            if req.status is RequestStatus.RUNNING and req.num_uncomputed_tokens == 1 \
                    and self._grow_or_preempt(req):
                scheduled.append(self._slice(req, 1))
                budget -= 1
        for req in self.running:  # b. prompt chunks of running sequences
            if req.num_uncomputed_tokens > 1 and budget > 0:
                scheduled.append(self._slice(req, min(req.num_uncomputed_tokens, budget)))
                budget -= len(scheduled[-1].token_ids)
        self.arrivals.reserve()  # c.
        blocked = False  # d. first come first served, except that a request holding all its
        for req in list(self.waiting):  # blocks (arrived KV) never waits behind one that can't
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self._missing_blocks(req) and (blocked or not self._ensure_blocks(req)):
                blocked = True
                continue
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._slice(req, min(req.num_uncomputed_tokens, budget)))
            budget -= len(scheduled[-1].token_ids)
        return SchedulerOutput(tuple(scheduled))

    def update(self, batch: SchedulerOutput, sampled: dict[str, SampledToken]
               ) -> list[TokenOutput]:
        """Apply one forward's results; return this step's outputs."""
        outputs, self._outputs = self._outputs, []
        for seq in batch.sequences:
            req = self.requests.get(seq.request_id)
            if req is None or req.num_computed_tokens != seq.num_computed_tokens:
                continue  # ended (or ended and its id reused) while the forward was in flight
            req.num_computed_tokens += len(seq.token_ids)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            req.token_ids.append(token.token_id)
            status = req.finish_status_after(token.token_id, self.eos_token_ids)
            if status is not None:
                self._finish(req, status, emit=False)
            outputs.append(TokenOutput(req.request_id, token, status is not None,
                                       None if status is None else status.finish_reason,
                                       kv_recomputed=req.kv_recomputed,
                                       kv_receive_s=req.kv_receive_s))
            req.kv_receive_s = None  # reported once, on the first decoded token
        return outputs

    def continue_decode(self, batch: SchedulerOutput) -> SchedulerOutput | None:
        """The decode step after ``batch`` (in flight, not yet ``update``d): every live row one
        position on with a placeholder token; None when the next step needs ``schedule``.
        Polls remote pulls and reserves blocks for queued remote requests, as ``schedule``."""
        self._poll_remote()
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return None  # something to admit
        live = []
        for seq in batch.sequences:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue  # aborted while in flight
            if len(seq.token_ids) != 1 or seq.sample_step is None \
                    or req.status is not RequestStatus.RUNNING \
                    or req.num_computed_tokens != seq.num_computed_tokens:
                return None
            if seq.sample_step + 1 < req.request.max_tokens:  # else it ends with this batch
                live.append((seq, req))
        carried = {seq.request_id for seq in batch.sequences}
        if not live or any(r.request_id not in carried for r in self.running):
            return None  # nothing to continue, or a running sequence this batch lacks
        bs = self.pool.block_size
        missing = [blocks_for(seq.num_computed_tokens + 2, bs) - req.block_table.num_blocks
                   for seq, req in live]
        if not self.pool.can_allocate(sum(m for m in missing if m > 0)):
            return None  # schedule preempts
        rows = []
        for (seq, req), m in zip(live, missing):
            if m > 0:
                req.block_table = self.pool.grow(req.block_table, m)
            rows.append(ScheduledSequence(
                req.request_id, (PLACEHOLDER_TOKEN,), seq.num_computed_tokens + 1,
                req.block_table, seq.sample_step + 1, seq.params, seq.seed))
        self.arrivals.reserve()
        return SchedulerOutput(tuple(rows))

    def _check_new(self, request: EngineRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in this engine")
        num_tokens = request.num_prompt_tokens + request.max_tokens
        if num_tokens > self.pool.capacity_tokens:
            raise PoolCapacityError(
                f"request {request.request_id!r} needs up to {num_tokens} tokens of KV (prompt "
                f"{request.num_prompt_tokens} + max_tokens {request.max_tokens}); this decode "
                f"engine's pool holds {self.pool.capacity_tokens} ({self.pool.num_total_blocks} "
                f"blocks of {self.pool.block_size})", param="max_tokens")

    def _poll_remote(self) -> None:
        arrived, failed = self.arrivals.poll()
        for req in arrived:
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)  # it holds blocks: run it before anything new
        for req, error in failed:
            self._finish(req, RequestStatus.FINISHED_ERROR, error)

    def _slice(self, req: DecodeRequest, num_tokens: int) -> ScheduledSequence:
        start = req.num_computed_tokens
        end = start + num_tokens
        return ScheduledSequence(
            req.request_id, tuple(req.token_ids[start:end]), start, req.block_table,
            req.num_generated_tokens if end == req.num_tokens else None,
            req.request.params, req.request.seed)

    def _missing_blocks(self, req: DecodeRequest) -> int:
        """Blocks ``req`` lacks to hold K/V of all its tokens."""
        return blocks_for(req.num_tokens, self.pool.block_size) - req.block_table.num_blocks

    def _ensure_blocks(self, req: DecodeRequest) -> bool:
        missing = self._missing_blocks(req)
        if missing <= 0:
            return True
        if not self.pool.can_allocate(missing):
            return False
        req.block_table = self.pool.grow(req.block_table, missing)
        return True

    def _grow_or_preempt(self, req: DecodeRequest) -> bool:
        """Blocks for ``req``'s next token, preempting the newest running sequences as needed;
        False when ``req`` itself had to be preempted."""
        while not self._ensure_blocks(req):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: DecodeRequest) -> None:
        self.running.remove(req)
        if req.kv_attention is not None:  # remote KV: recomputed densely, and reported so
            req.kv_recomputed = True
        self.pool.free(req.block_table)
        req.block_table = BlockTable()
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _finish(self, req: DecodeRequest, status: RequestStatus,
                error: DisaggError | None = None, *, emit: bool = True) -> None:
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if self.arrivals.remove(req):  # else fenced: the tracker frees them when safe
            self.pool.free(req.block_table)
        req.block_table = BlockTable()
        req.status, req.error = status, error
        if emit:
            self._outputs.append(TokenOutput(req.request_id, None, True, status.finish_reason,
                                             error))

