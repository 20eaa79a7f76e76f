"""Sequence-parallel prefill: one prompt over the ``W`` ranks of an SP group.

Life of a request on each rank (every rank runs the same steps, in the same request order):
1. ``open_writer(offers)``: a writer for this rank's part of the first offered destination a
   sender of the rank can reach and that can take a shard (``SHARDABLE_BACKENDS``): the
   rank's rows of decode's reservation, re-indexed to the rank's local token order.
2. ``prefill(request, writer)``: the model runs over the rank's zigzag shard (``sp_plan``);
   each layer's K/V of the rank's tokens go to its writer the moment they are computed; the
   layers exchange what attention needs (``sp_attention``).
3. Rank 0 holds position ``N - 1``: it samples token 0 there, with the request's keyed seed
   (step 0), exactly as the single-device engine does.
4. The coordinator gives every rank the ``KVHeader`` and ``finish``es each rank's writer; the
   ranks' ``KVCompletion`` records are merged into one (``merge_completions``).
Nothing here knows about Ray: the ranks' processes and their group are made by the caller
(``deployments/sp_group.py`` for Serve, ``torch.multiprocessing`` in tests and benchmarks).

Why an all-gather of K/V for dense layers, not ring attention. Both can do only causal work:
each chunk's causal diagonal block plus unmasked rectangles of earlier keys, merged by
log-sum-exp. What differs is how the work is cut and how the bytes move:
- With GQA the K/V of a layer is small: Llama-3.1-8B at 128K is 512 MiB for the whole
  prompt (8 KV heads); each rank of SP=2 receives 256 MiB per dense layer, 0.7 ms at the
  369 GB/s NCCL send/recv measured between two H200s, against ~130 ms of attention per rank
  and layer. The gathered layer (freed after it) is 4 GiB at 1M tokens, on a 141 GB GPU.
- The gather of a layer is started before the diagonal blocks (which need only local K/V)
  and waited for after them, so it hides under compute; ring attention needs ``W - 1``
  such overlaps per layer, each with a smaller kernel call.
- Per chunk exactly two library calls: the causal square (cuDNN's best shape) and one
  rectangle of all earlier keys (no mask: cuDNN at full rate). Ring attention cuts the
  rectangle into ``W - 1`` pieces and adds ``W - 2`` merges; its advantage, never holding
  the whole prompt's K/V of a layer, does not matter at these sizes.
- A single call with a lower-right causal mask does not qualify: cuDNN computes the whole
  rectangle for it, and FA2 reaches ~335 TFLOP/s of useful work (GPU.md).
Triangle layers need no gather: each chunk's first ``n_sink`` and last ``n_window - 1`` K/V
rows (megabytes) and the last rows' partial results merged by log-sum-exp.

KV hand-off: each rank writes its own rows (``inprocess`` and ``cuda_ipc`` in place; the
object store publishes each rank's rows with their runs, decode copies every part in). The
``nccl``/``gloo`` pairings carry one writer per destination, so an SP rank does not write
through them (an SP replica's decode offers must include another backend).
Every collective has a deadline (``sp_comm``); after one fails the group must be replaced.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from disagg.attention.prefill import KVSink
from disagg.errors import KVTransferError
from disagg.kv.layout import PackedKV
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.sp_attention import LayerBytes, SPPrefillAttention
from disagg.prefill.sp_comm import SPCollectives
from disagg.prefill.sp_plan import ZigzagPlan
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, sample
from disagg.transport.base import KVCompletion, KVDestination, KVWriter

SHARDABLE_BACKENDS = ("inprocess", "cuda_ipc", "object_store")


@dataclass(frozen=True)
class RankPrefillResult:
    """What one rank's part of a prefill produced (``first_token`` on rank 0 only; ``kv``,
    the rank's rows in local order, only when no writer was given)."""

    request_id: str
    rank: int
    first_token: SampledToken | None
    prefill_s: float
    layer_bytes: LayerBytes
    kv: PackedKV | None = field(default=None, repr=False)


class SequenceParallelPrefill:
    """One rank of an SP group: owns the rank's engine (weights, senders) and its group."""

    def __init__(self, engine: PrefillEngine, comm: SPCollectives, *, check_every: int = 8):
        self.engine = engine
        self.comm = comm
        self.check_every = check_every

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def plan(self, num_tokens: int) -> ZigzagPlan:
        return ZigzagPlan(num_tokens, self.world_size)

    def open_writer(self, offers: Sequence[KVDestination]) -> KVWriter:
        """A writer of this rank's rows, for the first shardable offer it can reach."""
        shardable = tuple(d for d in offers if d.backend in SHARDABLE_BACKENDS)
        if not shardable:
            raise KVTransferError(f"no offered KV destination ({[d.backend for d in offers]}) "
                                  f"can take a sequence-parallel shard "
                                  f"({', '.join(SHARDABLE_BACKENDS)} can)")
        plan = self.plan(shardable[0].num_prompt_tokens)
        return self.engine.open_writer(tuple(plan.shard_destination(d, self.rank)
                                             for d in shardable))

    @torch.inference_mode()
    def prefill(self, request: EngineRequest, sink: KVSink | None = None,
                cancelled: Callable[[], bool] | None = None) -> RankPrefillResult:
        t0 = time.perf_counter()
        engine, model, device = self.engine, self.engine.model, self.engine.device
        plan = self.plan(request.num_prompt_tokens)
        kv = None
        if sink is None:
            kv = PackedKV.empty(engine.layout, plan.num_local(self.rank), device)
        metadata = SPPrefillAttention(plan, self.comm, sink or kv, model.scale,
                                      engine.trianglemix, cancelled, self.check_every)
        positions = plan.positions(self.rank, device)
        tokens = request.prompt_tensor(device)[positions]
        hidden = model(tokens, positions, metadata)
        metadata.check_status("after the last layer")
        first = None
        if self.rank == 0:  # its last local row is position N - 1 (sp_plan)
            logits = model.compute_logits(hidden[-1:])[0]
            first = sample(logits, request.params, request.seed, step=0)
        elif device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return RankPrefillResult(request.request_id, self.rank, first,
                                 time.perf_counter() - t0, metadata.layer_bytes, kv)


def merge_completions(completions: Sequence[KVCompletion]) -> KVCompletion:
    """One record for a request whose ranks each wrote their own rows: bytes add up, the
    write wait is the slowest rank's; object-store locators travel together (each holds its
    rank's rows and runs), direct backends have none."""
    first = completions[0]
    if any(c.backend != first.backend or c.request_id != first.request_id
           for c in completions):
        raise KVTransferError("SP ranks wrote one request through different backends")
    payloads = tuple(c.payload for c in completions if c.payload is not None)
    return dataclasses.replace(
        first, num_bytes=sum(c.num_bytes for c in completions),
        write_wait_s=max(c.write_wait_s for c in completions),
        payload=payloads if payloads else None)
