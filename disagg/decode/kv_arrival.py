"""Remote requests on the decode side, from block reservation until their KV is in the pool.

Life of a remote request here (it is WAITING_FOR_REMOTE_KV throughout):
1. ``add``: blocks for its prompt and token 0 are reserved at once, or it queues (FIFO) until the pool has
   them; the wait for ``kv_ready`` has a deadline (``remote_kv_timeout_s``).
2. ``start_pull`` (after ``kv_ready``, once reserved): ``KVReceiver.start`` with a deadline
   (``kv_pull_timeout_s``), which this tracker also enforces in case a receiver never reports.
3. ``poll`` (every engine step): a DONE pull's header is checked again (defence in depth)
   and its KV written into the reserved blocks: the request has *arrived*. Anything else --
   FAILED, EXPIRED, ABORTED, a deadline passed, a mismatched header -- *fails* it.
4. ``remove`` on every other exit: the request leaves the queues, and a lease it still holds
   is released through the receiver (a pull started and aborted at once is how the receiver
   protocol releases a lease it has not pulled).
Blocks are freed by the scheduler, the one owner of a request's end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from disagg.decode.request import DecodeRequest
from disagg.errors import DisaggError, KVMismatchError, KVTransferError
from disagg.kv.block_pool import BlockPool, blocks_for
from disagg.kv.layout import KVFingerprint, KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.transport.base import KVHandle, KVReceiver, ReceiveResult, TransferStatus


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
    """Reservation queue and in-flight pulls of remote requests."""

    def __init__(self, receiver: KVReceiver | None, pool: BlockPool, cache: PagedKVCache,
                 expectation: KVExpectation, *, pull_timeout_s: float, remote_timeout_s: float,
                 clock: Callable[[], float]):
        self.receiver = receiver
        self.expectation = expectation
        self._pool = pool
        self._cache = cache
        self._pull_timeout_s = pull_timeout_s
        self._remote_timeout_s = remote_timeout_s
        self._clock = clock
        self._reserving: deque[DecodeRequest] = deque()  # FIFO, no blocks yet
        self._reserved: dict[str, DecodeRequest] = {}  # blocks held, KV not yet written

    def add(self, req: DecodeRequest) -> None:
        req.deadline = self._clock() + self._remote_timeout_s
        self._reserving.append(req)
        self.reserve()

    def reserve(self) -> None:
        """Reserve blocks for queued requests, first come first served."""
        while self._reserving:
            req = self._reserving[0]
            # Room for the prompt and token 0's K/V: an arrived request needs no new block.
            num_blocks = blocks_for(req.num_prompt_tokens + 1, self._pool.block_size)
            if not self._pool.can_allocate(num_blocks):
                return
            self._reserving.popleft()
            req.block_table = self._pool.allocate(num_blocks)
            self._reserved[req.request_id] = req
            if req.remote is not None:
                self.start_pull(req)

    def is_reserved(self, req: DecodeRequest) -> bool:
        return req.request_id in self._reserved

    def start_pull(self, req: DecodeRequest) -> None:
        """Pull ``req``'s KV now if its blocks are reserved (else when they are)."""
        if self.is_reserved(req) and not req.pull_started:
            self.receiver.start(req.remote.handle, timeout_s=self._pull_timeout_s)
            req.pull_started = True
            req.deadline = self._clock() + self._pull_timeout_s

    def poll(self) -> tuple[list[DecodeRequest], list[tuple[DecodeRequest, DisaggError]]]:
        """Requests whose KV arrived in their blocks, and requests that failed (with why)."""
        arrived, failed = [], []
        now = self._clock()
        for req in [*self._reserving, *self._reserved.values()]:
            if req.pull_started:
                result = self.receiver.poll(req.request_id)
                if result.status is TransferStatus.PENDING and now <= req.deadline:
                    continue
                req.pull_started = False
                req.remote = None  # the lease is gone: pulled, expired or released
                error = self._accept(req, result) if result.status is TransferStatus.DONE \
                    else self._transfer_error(req, result)
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

    def remove(self, req: DecodeRequest) -> None:
        """``req`` ends: forget it and release a lease it still holds."""
        self._drop(req)
        if req.remote is not None:
            if req.pull_started:
                self.receiver.abort(req.request_id)
            else:
                self.release_lease(req.request_id, req.remote.handle)
            req.remote = None
            req.pull_started = False

    def release_lease(self, request_id: str, handle: KVHandle) -> None:
        """Release a lease nobody will pull (the receiver protocol releases through abort)."""
        self.receiver.start(handle, timeout_s=self._pull_timeout_s)
        self.receiver.abort(request_id)

    def _drop(self, req: DecodeRequest) -> None:
        self._reserved.pop(req.request_id, None)
        if req in self._reserving:
            self._reserving.remove(req)

    def _accept(self, req: DecodeRequest, result: ReceiveResult) -> DisaggError | None:
        """Check a delivered header and KV again and write the KV into ``req``'s blocks."""
        header, kv, n = result.header, result.kv, req.num_prompt_tokens
        error = self.expectation.mismatch(req.request_id, header.fingerprint, n)
        if error is None and (header.request_id != req.request_id
                              or header.first_token_id != req.token_ids[n]
                              or kv is None or kv.num_tokens != n):
            error = KVMismatchError(
                f"KV delivered for request {req.request_id!r} does not match it: header of "
                f"{header.request_id!r} with first token {header.first_token_id}, "
                f"{None if kv is None else kv.num_tokens} rows; expected first token "
                f"{req.token_ids[n]} and {n} rows")
        if error is not None:
            return error
        try:
            self._cache.write_packed(req.block_table, kv)
        except KVMismatchError as e:
            return KVMismatchError(f"KV for request {req.request_id!r}: {e}")
        req.num_computed_tokens = n
        return None

    def _transfer_error(self, req: DecodeRequest, result: ReceiveResult) -> KVTransferError:
        if result.status is TransferStatus.PENDING:  # our own deadline: the receiver is stuck
            self.receiver.abort(req.request_id)
            return KVTransferError(f"KV pull for request {req.request_id!r} did not finish "
                                   f"within {self._pull_timeout_s} s")
        return KVTransferError(f"KV pull for request {req.request_id!r} "
                               f"{result.status.value}: {result.error or 'no reason given'}")

