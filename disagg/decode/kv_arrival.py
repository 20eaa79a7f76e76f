"""Remote requests on the decode side, from block reservation until their KV is in the pool.

Life of a remote request here (it is WAITING_FOR_REMOTE_KV throughout):
1. ``add``: blocks for its prompt and token 0 are reserved at once, or it queues (FIFO) until
   the pool has them. Only once reserved does it get its ``KVDestination`` offers (each
   receiver names the reserved rows): prefill is never called before that. One deadline
   (``remote_kv_timeout_s``) covers the whole remote wait; the destination expires with it.
2. ``complete`` (prefill's completion record, fingerprint already checked by the scheduler):
   the receiver finishes receiving.
3. ``poll`` (every engine step): DONE means every layer is confirmed in the reserved rows: the
   request has *arrived*. FAILED, EXPIRED, ABORTED or the deadline passing *fails* it.
4. ``remove`` on every other exit. Rows a writer may still be writing (a destination was handed
   out, and neither a completion nor ``writer_done`` confirmed the writer stopped) are *fenced*:
   they return to the pool only on ``writer_done`` or when the destination has expired (no
   writer writes after that), so KV of a cancelled request can never land in another's blocks.
Blocks of requests that end otherwise are freed by the scheduler, the one owner of an end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from disagg.decode.request import DecodeRequest
from disagg.errors import DisaggError, KVMismatchError, KVTransferError
from disagg.kv.block_pool import BlockPool, BlockTable, blocks_for
from disagg.kv.layout import KVFingerprint, KVLayout
from disagg.transport.base import KVCompletion, TransferStatus
from disagg.transport.receivers import ReceiverSet

# A copy queued just before its destination expired may still run for a moment after.
_FENCE_MARGIN_S = 5.0


@dataclass(frozen=True)
class KVExpectation:
    """What this engine accepts: KV of its model, dtype and layout, for the whole prompt."""

    model_name: str
    layout: KVLayout

    def fingerprint(self, num_prompt_tokens: int, attention: str) -> KVFingerprint:
        return KVFingerprint(self.model_name, str(self.layout.dtype), self.layout.tag,
                             attention, num_prompt_tokens)

    def mismatch(self, request_id: str, got: KVFingerprint,
                 num_prompt_tokens: int) -> KVMismatchError | None:
        """The error to raise for ``got``, or None when it is acceptable. The prefill's
        attention config is recorded, not required: decode attends densely over any KV."""
        problems = got.mismatches(self.fingerprint(num_prompt_tokens, got.attention))
        if not problems:
            return None
        return KVMismatchError(f"KV for request {request_id!r} was not produced for this decode "
                               f"engine: " + "; ".join(problems))


class KVArrivalTracker:
    """Reservation queue, destinations, in-flight hand-offs and fenced rows."""

    def __init__(self, receivers: ReceiverSet | None, pool: BlockPool,
                 expectation: KVExpectation, *, remote_timeout_s: float,
                 clock: Callable[[], float]):
        self.receivers = receivers
        self.expectation = expectation
        self._pool = pool
        self._remote_timeout_s = remote_timeout_s
        self._clock = clock
        self._reserving: deque[DecodeRequest] = deque()  # FIFO, no blocks yet
        self._reserved: dict[str, DecodeRequest] = {}  # blocks held, KV not yet usable
        self._fenced: dict[str, tuple[BlockTable, float]] = {}  # rows a writer may touch

    def add(self, req: DecodeRequest) -> None:
        req.deadline = self._clock() + self._remote_timeout_s
        self._reserving.append(req)
        self.reserve()

    def reserve(self) -> None:
        """Reserve blocks for queued requests, first come first served, and name each one's
        destination."""
        while self._reserving:
            req = self._reserving[0]
            # Room for the prompt and token 0's K/V: an arrived request needs no new block.
            num_blocks = blocks_for(req.num_prompt_tokens + 1, self._pool.block_size)
            if not self._pool.can_allocate(num_blocks):
                return
            self._reserving.popleft()
            req.block_table = self._pool.allocate(num_blocks)
            runs = tuple(req.block_table.slot_runs(self._pool.block_size, 0,
                                                   req.num_prompt_tokens))
            req.offers = self.receivers.destinations(
                req.request_id, runs, req.num_prompt_tokens,
                ttl_s=max(req.deadline - self._clock(), 0.0))
            self._reserved[req.request_id] = req

    def complete(self, req: DecodeRequest, completion: KVCompletion) -> None:
        req.kv_completed = True  # the writer has stopped: its rows need no fence
        req.kv_completed_at = self._clock()
        self.receivers.complete(completion)

    def fence_for(self, req: DecodeRequest, grace_s: float) -> None:
        """``req`` was cancelled while its prefill may run: fence its rows for at most
        ``grace_s`` (a cancelled writer stops at its next layer) instead of until expiry."""
        req.fence_grace_s = grace_s

    def writer_done(self, request_id: str) -> None:
        """The prefill call of ``request_id`` ended: no writer can touch its rows any more."""
        fenced = self._fenced.pop(request_id, None)
        if fenced is not None:
            self._pool.free(fenced[0])

    @property
    def num_fenced_blocks(self) -> int:
        return sum(table.num_blocks for table, _ in self._fenced.values())

    def poll(self) -> tuple[list[DecodeRequest], list[tuple[DecodeRequest, DisaggError]]]:
        """Requests whose KV is usable in their blocks, and requests that failed (with why)."""
        now = self._clock()
        for request_id in [r for r, (_, until) in self._fenced.items() if now > until]:
            self.writer_done(request_id)
        arrived, failed = [], []
        for req in [*self._reserving, *self._reserved.values()]:
            if req.kv_completed:
                result = self.receivers.poll(req.request_id)
                if result.status is TransferStatus.PENDING and now <= req.deadline:
                    continue
                if result.status is TransferStatus.DONE:
                    req.num_computed_tokens = req.num_prompt_tokens
                    req.kv_receive_s = self._clock() - req.kv_completed_at  # copies included
                    error = None
                else:
                    error = KVTransferError(
                        f"KV hand-off of request {req.request_id!r} "
                        f"{'timed out' if result.status is TransferStatus.PENDING else result.status.value}: "
                        f"{result.error or 'no reason given'}")
            elif now > req.deadline:
                error = KVTransferError(f"request {req.request_id!r}: no KV arrived within "
                                        f"{self._remote_timeout_s} s of routing")
            else:
                continue
            self._drop(req)
            if error is None:
                arrived.append(req)
            else:
                failed.append((req, error))
        return arrived, failed

    def remove(self, req: DecodeRequest) -> bool:
        """``req`` ends: forget it. Returns False when its blocks are now fenced (this tracker
        frees them later), True when the caller frees them."""
        self._drop(req)
        if not req.offers:
            return True
        self.receivers.release(req.request_id)
        fence = not req.kv_completed and req.block_table.num_blocks
        if fence:
            until = max(req.deadline, self._clock())
            if req.fence_grace_s is not None:
                until = min(until, self._clock() + req.fence_grace_s)
            self._fenced[req.request_id] = (req.block_table, until + _FENCE_MARGIN_S)
        req.offers = ()
        return not fence

    def _drop(self, req: DecodeRequest) -> None:
        if self._reserved.pop(req.request_id, None) is not None and req.kv_completed:
            self.receivers.release(req.request_id)
        if req in self._reserving:
            self._reserving.remove(req)
