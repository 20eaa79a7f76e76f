"""The collectives of a sequence-parallel group, each with a deadline, and their byte count.

Two collectives serve every exchange of an SP prefill: an all-gather (dense layers' K/V, the
Triangle layers' boundary rows) and an all-reduce (the last rows' queries and their partial
results, the group's status flag). Both are started asynchronously, so a rank can compute
while the bytes move (``Pending.wait`` joins them), and every wait has a deadline:
- gloo (CPU): ``Work.wait(timeout)`` raises when it passes;
- NCCL (GPU): the wait only orders the compute stream after the collective; the deadline is
  the process group's own timeout, enforced by NCCL's watchdog, which aborts the
  communicator (and by default the process: the rank dies, its replica is replaced).
A collective that fails or times out raises ``SPCollectiveError``; the group is unusable
after it (its peers may be mid-collective), so its owner must be replaced, never reused.

``received_bytes`` counts what this rank receives, per the algorithm's payload: an all-gather
of ``b`` bytes per rank brings ``(W - 1) b``; a ring all-reduce of ``b`` bytes ``2 (W-1)/W b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from disagg.errors import DisaggError


class SPCollectiveError(DisaggError):
    """A collective of the SP group failed or passed its deadline (a rank died or stalled)."""


class Pending(Protocol):
    def wait(self) -> torch.Tensor: ...


class SPCollectives(Protocol):
    """What the SP attention needs from its group."""

    rank: int
    world_size: int
    received_bytes: int

    def all_gather(self, tensor: torch.Tensor) -> Pending:
        """Start gathering every rank's ``tensor`` (same shape everywhere); ``wait`` returns
        ``[W, *tensor.shape]``."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: str) -> Pending:
        """Start reducing ``tensor`` in place over the group (``op``: ``"sum"`` or ``"max"``);
        ``wait`` returns it."""
        ...


def all_reduce_bytes(num_bytes: int, world_size: int) -> int:
    return 2 * (world_size - 1) * num_bytes // world_size


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass
class _Work:
    work: dist.Work
    result: torch.Tensor
    timeout: timedelta
    what: str

    def wait(self) -> torch.Tensor:
        try:
            ok = self.work.wait(self.timeout)
        except Exception as e:
            raise SPCollectiveError(f"SP {self.what} failed: {e}") from e
        if ok is False:
            raise SPCollectiveError(f"SP {self.what} passed its {self.timeout} deadline")
        return self.result


class TorchDistCollectives:
    """``SPCollectives`` over a torch.distributed process group (NCCL or gloo)."""

    def __init__(self, group: dist.ProcessGroup | None, *, timeout_s: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.received_bytes = 0

    def all_gather(self, tensor: torch.Tensor) -> Pending:
        # Concatenated along dim 0 (what gloo and NCCL both take), viewed rank-major after.
        out = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        self.received_bytes += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        try:
            work = dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group,
                                               async_op=True)
        except Exception as e:
            raise SPCollectiveError(f"SP all-gather could not start: {e}") from e
        return _Work(work, out.view(self.world_size, *tensor.shape), self.timeout, "all-gather")

    def all_reduce(self, tensor: torch.Tensor, op: str) -> Pending:
        self.received_bytes += all_reduce_bytes(tensor.numel() * tensor.element_size(),
                                                self.world_size)
        try:
            work = dist.all_reduce(tensor, op=_OPS[op], group=self.group, async_op=True)
        except Exception as e:
            raise SPCollectiveError(f"SP all-reduce could not start: {e}") from e
        return _Work(work, tensor, self.timeout, "all-reduce")
