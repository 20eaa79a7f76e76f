"""Where each token of a prompt lives in a sequence-parallel group: the zigzag plan.

The prompt is cut into ``2W`` contiguous chunks for ``W`` ranks; rank ``r`` holds chunks ``r``
and ``2W - 1 - r`` (one early, one late), so every rank gets the same causal work within one
chunk's worth (a contiguous split gives the last rank most of the dense work and caps SP=2
near 1.5x). Chunk sizes differ by at most one token; the longer chunks are the last ones, so
position ``N - 1`` is always in chunk ``2W - 1``: rank 0 samples the first token.
A rank's tokens run in its local order: chunk ``r``'s tokens, then chunk ``2W - 1 - r``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch

from disagg.transport.base import KVDestination, Run

Span = tuple[int, int]  # [start, end) absolute positions


@dataclass(frozen=True)
class ZigzagPlan:
    num_tokens: int
    world_size: int

    def __post_init__(self):
        if self.num_tokens < 1 or self.world_size < 1:
            raise ValueError("a plan needs at least one token and one rank")

    @cached_property
    def chunk_spans(self) -> tuple[Span, ...]:
        num_chunks = 2 * self.world_size
        base, extra = divmod(self.num_tokens, num_chunks)
        spans, start = [], 0
        for c in range(num_chunks):
            size = base + (1 if c >= num_chunks - extra else 0)
            spans.append((start, start + size))
            start += size
        return tuple(spans)

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world_size - 1 - rank

    def spans(self, rank: int) -> tuple[Span, Span]:
        """The rank's two chunks, in its local order."""
        first, second = self.chunk_ids(rank)
        return self.chunk_spans[first], self.chunk_spans[second]

    def num_local(self, rank: int) -> int:
        return sum(e - s for s, e in self.spans(rank))

    @cached_property
    def max_local(self) -> int:
        return max(self.num_local(r) for r in range(self.world_size))

    def chunk_rank(self, chunk: int) -> tuple[int, int]:
        """(rank holding ``chunk``, its slot 0/1 in that rank's local order)."""
        w = self.world_size
        return (chunk, 0) if chunk < w else (2 * w - 1 - chunk, 1)

    def positions(self, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute positions of the rank's tokens, in local order ``[num_local]`` int64."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.spans(rank)])

    def local_offset(self, rank: int, slot: int) -> int:
        """Local index of the first token of the rank's chunk in ``slot`` (0 or 1)."""
        s, e = self.spans(rank)[0]
        return 0 if slot == 0 else e - s

    def gather_index(self, upto: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """For positions ``0 .. upto - 1``: rows of a padded all-gather ``[W * max_local]``
        (rank-major, each rank's tokens in its local order) holding them."""
        index = []
        for chunk, (s, e) in enumerate(self.chunk_spans):
            if s >= upto:
                break
            rank, slot = self.chunk_rank(chunk)
            base = rank * self.max_local + self.local_offset(rank, slot)
            index.append(torch.arange(base, base + min(e, upto) - s))
        if not index:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat(index).to(device)

    def shard_destination(self, destination: KVDestination, rank: int) -> KVDestination:
        """The part of ``destination`` holding this rank's tokens, with token indices local to
        the rank (its K/V rows in local order): a writer of any backend that writes runs then
        writes exactly the rank's rows of decode's reservation."""
        runs: list[Run] = []
        offset = 0
        for s, e in self.spans(rank):
            for slot, token, n in destination.runs:
                a, b = max(token, s), min(token + n, e)
                if a < b:
                    runs.append((slot + a - token, offset + a - s, b - a))
            offset += e - s
        return dataclasses.replace(destination, runs=tuple(runs),
                                   num_prompt_tokens=self.num_local(rank))
