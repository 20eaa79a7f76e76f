"""SP collectives for running a group's ranks on one device (benchmarks and GPU tests).

- ``LoopbackCollectives``: one rank alone, as if its peers held the same tensors. It moves no
  bytes between devices but does the local work a collective's caller sees (an all-gather
  writes ``W`` copies into a fresh buffer) and counts ``received_bytes`` exactly as
  ``TorchDistCollectives`` does. Values from "peers" are this rank's own, so outputs are
  meaningless; shapes, and therefore every kernel's work, are the real ones. This is how the
  projection times each rank's work one after another on one GPU.
- ``ThreadCollectives``: ``W`` ranks as threads of one process sharing one device (one CUDA
  stream, in program order): a real group, exact results, for correctness on one GPU.
"""

from __future__ import annotations

import threading

import torch

from disagg.prefill.sp_comm import all_reduce_bytes


class _Done:
    def __init__(self, result: torch.Tensor):
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


class LoopbackCollectives:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.received_bytes = rank, world_size, 0

    def all_gather(self, tensor: torch.Tensor) -> _Done:
        self.received_bytes += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        return _Done(tensor.unsqueeze(0).expand(self.world_size, *tensor.shape).contiguous())

    def all_reduce(self, tensor: torch.Tensor, op: str) -> _Done:
        self.received_bytes += all_reduce_bytes(tensor.numel() * tensor.element_size(),
                                                self.world_size)
        return _Done(tensor)


class ThreadGroup:
    """The shared state of ``W`` ``ThreadCollectives`` (one per rank thread)."""

    def __init__(self, world_size: int, timeout_s: float = 120.0):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def member(self, rank: int) -> ThreadCollectives:
        return ThreadCollectives(self, rank)


class ThreadCollectives:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.received_bytes = 0

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        g = self.group
        g.slots[self.rank] = tensor.clone()  # queued on the shared stream before the barrier
        g.barrier.wait()
        everyone = list(g.slots)
        g.barrier.wait()  # nobody overwrites a slot before every rank has taken them all
        return everyone

    def all_gather(self, tensor: torch.Tensor) -> _Done:
        self.received_bytes += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        return _Done(torch.stack(self._exchange(tensor)))

    def all_reduce(self, tensor: torch.Tensor, op: str) -> _Done:
        self.received_bytes += all_reduce_bytes(tensor.numel() * tensor.element_size(),
                                                self.world_size)
        stacked = torch.stack(self._exchange(tensor))
        tensor.copy_(stacked.sum(0) if op == "sum" else stacked.amax(0))
        return _Done(tensor)
