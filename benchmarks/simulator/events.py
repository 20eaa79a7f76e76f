"""The discrete-event engine: a clock and a heap of timed callbacks.

Events at the same time run in the order they were scheduled (a sequence number breaks ties),
so a run is a deterministic function of its inputs and seed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class EventLoop:
    def __init__(self):
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable, tuple]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` at time ``t`` (never in the past)."""
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, args))
        self._seq += 1

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: float = float("inf")) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)
