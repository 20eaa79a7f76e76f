"""The Triangle mask: its parameters and the exact count of the pairs it keeps.

Query row ``i`` keeps key column ``j`` of a prompt of ``N`` tokens iff
``j <= i and (i >= N - n_last or j < n_sink or i - j < n_window)``, with ``n_last`` clamped to
``N - 1``. Rows ``i >= N - n_last`` ("last rows") are dense; the others see the sinks and a
sliding window that includes the diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TriangleParams:
    """Shape of the Triangle mask (TriangleMix defaults)."""

    n_sink: int = 8  # leading "attention sink" keys every row sees
    n_window: int = 512  # sliding window, diagonal included
    n_last: int = 128  # trailing rows that attend densely (clamped to N - 1)

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_window < 1:
            raise ValueError(f"n_window must be >= 1, got {self.n_window}")
        if self.n_last < 0:
            raise ValueError(f"n_last must be >= 0, got {self.n_last}")

    def num_last(self, num_tokens: int) -> int:
        """Number of dense trailing rows in a prompt of ``num_tokens`` tokens."""
        return max(0, min(self.n_last, num_tokens - 1))

    def first_last_row(self, num_tokens: int) -> int:
        """Absolute position of the first dense trailing row (``num_tokens`` if none)."""
        return num_tokens - self.num_last(num_tokens)


def triangle_keep(i: torch.Tensor, j: torch.Tensor, num_tokens: int, params: TriangleParams):
    """Boolean "key j kept for query i" on broadcastable absolute positions."""
    last = i >= params.first_last_row(num_tokens)
    return (j <= i) & (last | (j < params.n_sink) | (i - j < params.n_window))


def num_kept_pairs(num_tokens: int, params: TriangleParams) -> int:
    """Exact number of (query, key) pairs the mask keeps over a whole prompt (per head)."""
    i = torch.arange(num_tokens, dtype=torch.int64)
    window = torch.clamp(i + 1, max=params.n_window)
    sinks = torch.clamp(i - params.n_window + 1, min=0).clamp(max=params.n_sink)
    per_row = torch.where(i >= params.first_last_row(num_tokens), i + 1, window + sinks)
    return int(per_row.sum())
