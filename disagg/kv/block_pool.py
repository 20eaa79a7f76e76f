"""The decode side's KV block pool: allocation in block *ranges* (extents).

The paged cache is, per layer, one contiguous tensor of ``num_blocks * block_size`` token rows
(``kv/layout.py``). A request's blocks are kept as a few contiguous runs, not a list of
scattered block ids, so its KV moves in a few large copies: received prompt KV is written
with one copy per run per layer, and a future GPU-direct transport can do the same.

Life of a request's blocks:
1. Reserve: ``allocate(n)`` when the request is admitted (local prefill) or routed (remote KV
   will arrive into these blocks). The pool returns as few runs as it can.
2. Grow: ``grow(table, n)`` as generated tokens fill the last block; it extends the last run in
   place when the blocks right after it are free.
3. Free: ``free(table)`` when the request finishes, is aborted, fails or is preempted. While
   a forward that may still write the table's rows is in flight on the device (the decode
   engine's overlapped steps), the engine holds frees: ``hold_frees_until(fence)``; they
   return to the free space at ``release_held(fence)``, once that forward has landed.

Pure bookkeeping: no tensors here (``paged_cache.py`` owns the storage).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockRange:
    """Blocks ``start .. start + num_blocks - 1``."""

    start: int
    num_blocks: int

    @property
    def end(self) -> int:
        return self.start + self.num_blocks


@dataclass(frozen=True)
class BlockTable:
    """One request's blocks, in token order: token position p lives in block
    ``block_ids[p // block_size]`` at row ``p % block_size``. Immutable: growing makes a new one."""

    ranges: tuple[BlockRange, ...] = ()

    @property
    def num_blocks(self) -> int:
        return sum(r.num_blocks for r in self.ranges)

    @property
    def block_ids(self) -> list[int]:
        return [b for r in self.ranges for b in range(r.start, r.end)]

    def slot_runs(self, block_size: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """Token positions ``[start, end)`` as contiguous cache-row runs
        ``(slot_start, token_start, num_tokens)`` -- one per block range they touch."""
        if end > self.num_blocks * block_size:
            raise ValueError(f"positions up to {end} need more than this table's "
                             f"{self.num_blocks} blocks of {block_size}")
        runs, run_first_token = [], 0
        for r in self.ranges:
            run_end_token = run_first_token + r.num_blocks * block_size
            lo, hi = max(start, run_first_token), min(end, run_end_token)
            if lo < hi:
                runs.append((r.start * block_size + lo - run_first_token, lo, hi - lo))
            run_first_token = run_end_token
        return runs


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` token rows."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Free space as a sorted list of disjoint, coalesced free ranges."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self._free_starts: list[int] = [0]  # sorted; parallel to _free_lengths
        self._free_lengths: list[int] = [num_blocks]
        self.num_free_blocks = num_blocks
        self._fence: int | None = None  # frees now wait for the forward of this fence
        self._held: list[tuple[int, BlockTable]] = []

    @property
    def num_held_blocks(self) -> int:
        """Freed blocks that a forward still in flight may write: not yet free."""
        return sum(t.num_blocks for _, t in self._held)

    def hold_frees_until(self, fence: int | None) -> None:
        """Frees from now on wait for ``release_held(fence)`` (fences increase); None: free
        at once again."""
        self._fence = fence

    def release_held(self, fence: int) -> None:
        """The forward of ``fence`` landed: free what was held for it or an earlier one."""
        ready = [t for f, t in self._held if f <= fence]
        self._held = [(f, t) for f, t in self._held if f > fence]
        for table in ready:
            for r in table.ranges:
                self._insert_free(r)

    @property
    def capacity_tokens(self) -> int:
        return self.num_total_blocks * self.block_size

    def free_ranges(self) -> tuple[BlockRange, ...]:
        return tuple(BlockRange(s, n) for s, n in zip(self._free_starts, self._free_lengths))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> BlockTable:
        """A new table of ``num_blocks`` blocks, in as few runs as the free space allows."""
        return BlockTable(self._take(num_blocks))

    def grow(self, table: BlockTable, num_blocks: int) -> BlockTable:
        """``table`` plus ``num_blocks`` more, extending its last run in place when possible."""
        if not self.can_allocate(num_blocks):
            raise MemoryError(f"{num_blocks} blocks asked, {self.num_free_blocks} free")
        ranges = list(table.ranges)
        if ranges and num_blocks:
            last = ranges[-1]
            i = bisect.bisect_left(self._free_starts, last.end)
            if i < len(self._free_starts) and self._free_starts[i] == last.end:
                n = min(num_blocks, self._free_lengths[i])
                self._remove_from_free(i, n)
                ranges[-1] = BlockRange(last.start, last.num_blocks + n)
                num_blocks -= n
        return BlockTable((*ranges, *self._take(num_blocks)))

    def free(self, table: BlockTable) -> None:
        """Return every block of ``table`` (a double free raises: it would corrupt the pool);
        held while frees are held (``hold_frees_until``)."""
        if self._fence is not None:
            if table.ranges:
                self._held.append((self._fence, table))
            return
        for r in table.ranges:
            self._insert_free(r)

    def _take(self, num_blocks: int) -> tuple[BlockRange, ...]:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if not self.can_allocate(num_blocks):
            raise MemoryError(f"{num_blocks} blocks asked, {self.num_free_blocks} free")
        # Fewest runs: the k largest free ranges cover the request for the smallest possible k;
        # the last piece goes to the smallest range that holds it (best fit), so that large
        # ranges stay whole for later requests.
        taken: list[BlockRange] = []
        remaining = num_blocks
        while remaining:
            fits = [i for i, n in enumerate(self._free_lengths) if n >= remaining]
            if fits:
                i = min(fits, key=lambda j: (self._free_lengths[j], self._free_starts[j]))
                n = remaining
            else:
                i = max(range(len(self._free_lengths)), key=lambda j: self._free_lengths[j])
                n = self._free_lengths[i]
            taken.append(BlockRange(self._free_starts[i], n))
            self._remove_from_free(i, n)
            remaining -= n
        return tuple(taken)

    def _remove_from_free(self, i: int, n: int) -> None:
        """Take the first ``n`` blocks of free range ``i``."""
        if n == self._free_lengths[i]:
            del self._free_starts[i], self._free_lengths[i]
        else:
            self._free_starts[i] += n
            self._free_lengths[i] -= n
        self.num_free_blocks -= n

    def _insert_free(self, r: BlockRange) -> None:
        if r.start < 0 or r.end > self.num_total_blocks or r.num_blocks < 1:
            raise ValueError(f"{r} is not a range of this pool")
        i = bisect.bisect_left(self._free_starts, r.start)
        prev_end = self._free_starts[i - 1] + self._free_lengths[i - 1] if i else 0
        next_start = self._free_starts[i] if i < len(self._free_starts) else self.num_total_blocks
        if (i and prev_end > r.start) or r.end > next_start:
            raise ValueError(f"double free: {r} overlaps free space")
        merge_prev = i > 0 and prev_end == r.start
        merge_next = i < len(self._free_starts) and next_start == r.end
        if merge_prev and merge_next:
            self._free_lengths[i - 1] += r.num_blocks + self._free_lengths[i]
            del self._free_starts[i], self._free_lengths[i]
        elif merge_prev:
            self._free_lengths[i - 1] += r.num_blocks
        elif merge_next:
            self._free_starts[i] = r.start
            self._free_lengths[i] += r.num_blocks
        else:
            self._free_starts.insert(i, r.start)
            self._free_lengths.insert(i, r.num_blocks)
        self.num_free_blocks += r.num_blocks
