"""Attention metadata of one rank's forward in a sequence-parallel prefill.

The rank's tokens are two chunks of the prompt (``ZigzagPlan``), in local order. For each
layer ``attend`` gets their q, k, v (RoPE applied at their absolute positions), hands k, v to
the rank's KV sink (its own rows of decode's reservation) and returns their attention:

Dense layer (all-gather of K/V, causal work only; the choice is argued in
``sequence_parallel``):
1. start the all-gather of this rank's K/V (padded to ``max_local`` rows);
2. meanwhile, each chunk's causal diagonal block against its own keys (no remote data);
3. after the gather, each chunk's unmasked rectangle against every key before it;
4. merge diagonal and rectangle by log-sum-exp (exact).

Triangle layer (window halo, megabytes):
1. all-gather every chunk's first ``n_sink`` and last ``n_window - 1`` K/V rows (fixed size),
   and all-reduce the last ``n_last`` query rows (each rank adds the rows it owns);
2. middle rows of a chunk: the Triangle kernel over [halo window + own keys] and, apart, the
   sinks the window does not cover, merged by log-sum-exp;
3. last rows: every rank attends them over its own keys; the partial results are merged
   exactly by an all-reduce of the log-sum-exp maximum, then of the weighted sums.
A status all-reduce every ``check_every`` layers and after the last one makes the group stop
together: a rank that was cancelled, or whose KV write failed, ends every rank's forward at
the same layer (none is left waiting in a collective for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from disagg_kernels.triangle_mix import merge_attention, triangle_attention

from disagg.attention.metadata import AttentionKind
from disagg.attention.partial import attention_with_lse
from disagg.attention.prefill import KVSink, PrefillCancelled
from disagg.attention.triangle import TriangleMixConfig
from disagg.errors import DisaggError
from disagg.prefill.sp_comm import SPCollectives
from disagg.prefill.sp_plan import ZigzagPlan

OK, CANCELLED, FAILED = 0, 1, 2


class SPRankFailed(DisaggError):
    """A rank of the SP group could not go on (its KV write failed); every rank stops."""


@dataclass
class LayerBytes:
    """Bytes this rank received per layer kind (the last layer of each kind seen)."""

    dense: int = 0
    triangle: int = 0


@dataclass
class SPPrefillAttention:
    plan: ZigzagPlan
    comm: SPCollectives
    sink: KVSink
    scale: float
    trianglemix: TriangleMixConfig | None = None
    cancelled: Callable[[], bool] | None = None
    check_every: int = 8
    layer_bytes: LayerBytes = field(default_factory=LayerBytes)
    device: torch.device | None = None  # the rank's device, known from its first layer
    _status: int = OK
    _error: str = ""
    _halo: dict = field(default_factory=dict)  # per-request index tensors, built once

    @property
    def rank(self) -> int:
        return self.comm.rank

    def kind(self, layer_idx: int) -> AttentionKind:
        if self.trianglemix is None:
            return AttentionKind.DENSE
        return self.trianglemix.kind(layer_idx, self.plan.num_tokens)

    def attend(self, layer_idx: int, q, k, v) -> torch.Tensor:
        self.device = q.device
        if q.shape[0] != self.plan.num_local(self.rank):
            raise ValueError(f"rank {self.rank} got {q.shape[0]} rows, its shard has "
                             f"{self.plan.num_local(self.rank)}")
        if layer_idx % self.check_every == 0:
            self.check_status(f"before layer {layer_idx}")
        if self._status == OK:
            try:
                self.sink.write_layer(layer_idx, k, v)
            except Exception as e:  # noqa: BLE001 (reported to every rank at the next check)
                self._status, self._error = FAILED, f"rank {self.rank}: {e!r}"
        before, kind = self.comm.received_bytes, self.kind(layer_idx)
        if kind is AttentionKind.TRIANGLE:
            out = self._triangle(q, k, v)
            self.layer_bytes.triangle = self.comm.received_bytes - before
        elif kind is AttentionKind.DENSE:
            out = self._dense(q, k, v)
            self.layer_bytes.dense = self.comm.received_bytes - before
        else:  # every rank raises here, at the same layer: no peer is left in a collective
            raise ValueError(f"sequence-parallel prefill does not run {kind.value} layers")
        return out

    def check_status(self, where: str) -> None:
        """All ranks agree whether to go on; raise on every rank if any cannot."""
        if self._status == OK and self.cancelled is not None and self.cancelled():
            self._status = CANCELLED
        flag = torch.tensor([self._status], dtype=torch.int32, device=self.device or "cpu")
        status = int(self.comm.all_reduce(flag, "max").wait().item())
        if status == CANCELLED:
            raise PrefillCancelled(f"SP prefill cancelled {where}")
        if status == FAILED:
            raise SPRankFailed(f"SP prefill stopped {where}: "
                               f"{self._error or 'another rank failed'}")

    # -- dense layers -------------------------------------------------------------------

    def _dense(self, q, k, v) -> torch.Tensor:
        plan, n_local = self.plan, q.shape[0]
        kv = k.new_zeros((2, plan.max_local, *k.shape[1:]))
        kv[0, :n_local], kv[1, :n_local] = k, v
        pending = self.comm.all_gather(kv)
        chunks = self._local_chunks()
        diagonal = [attention_with_lse(q[a:b], k[a:b], v[a:b], causal=True, scale=self.scale)
                    for a, b, _ in chunks]
        gathered = pending.wait()  # [W, 2, max_local, Hkv, D]
        out = torch.empty_like(q)
        last_start = max((s for _, _, s in chunks), default=0)
        index = plan.gather_index(last_start, q.device)
        keys = gathered[:, 0].reshape(-1, *k.shape[1:]).index_select(0, index)
        values = gathered[:, 1].reshape(-1, *k.shape[1:]).index_select(0, index)
        for (a, b, s), (o, lse) in zip(chunks, diagonal):
            if s > 0:
                o_r, lse_r = attention_with_lse(q[a:b], keys[:s], values[:s], causal=False,
                                                scale=self.scale)
                o, _ = merge_attention([o, o_r], [lse, lse_r])
            out[a:b] = o
        return out

    def _local_chunks(self) -> list[tuple[int, int, int]]:
        """Non-empty local chunks as (local start, local end, absolute start)."""
        chunks, offset = [], 0
        for s, e in self.plan.spans(self.rank):
            if e > s:
                chunks.append((offset, offset + e - s, s))
            offset += e - s
        return chunks

    # -- Triangle layers ----------------------------------------------------------------

    def _triangle(self, q, k, v) -> torch.Tensor:
        params, n = self.trianglemix.params, self.plan.num_tokens
        first_last = params.first_last_row(n)
        positions = self._positions(q.device)
        rows = self._boundary_rows(q.device)  # [2 * (head + tail)] local rows or -1
        boundary = k.new_zeros((rows.shape[0], 2, *k.shape[1:]))
        valid = rows >= 0
        boundary[valid, 0], boundary[valid, 1] = k[rows[valid]], v[rows[valid]]
        pending_halo = self.comm.all_gather(boundary)
        mine = positions >= first_last
        q_last = q.new_zeros((n - first_last, *q.shape[1:]))
        q_last[positions[mine] - first_last] = q[mine]
        pending_q = self.comm.all_reduce(q_last, "sum")
        halo = pending_halo.wait().reshape(-1, 2, *k.shape[1:])  # [W * 2 * (head+tail), 2, ...]
        q_last = pending_q.wait()
        out = torch.empty_like(q)
        partial_o, partial_lse = [], []
        for (a, b, s) in self._local_chunks():
            m = min(b, a + max(first_last - s, 0))  # local rows [a, m) are middle rows
            if m > a:
                out[a:m] = self._middle_rows(q[a:m], k[a:m], v[a:m], s, halo)
            o, lse = triangle_attention(q_last, k[a:b], v[a:b], num_tokens=n,
                                        q_start=first_last, k_start=s, params=params,
                                        scale=self.scale)
            partial_o.append(o)
            partial_lse.append(lse)
        last = self._merge_last_rows(q_last, partial_o, partial_lse)
        out[mine] = last[positions[mine] - first_last]
        return out

    def _middle_rows(self, q, k, v, s: int, halo: torch.Tensor) -> torch.Tensor:
        """Rows at ``s ..`` (all before the last rows) over sinks + window halo + own keys."""
        params, n = self.trianglemix.params, self.plan.num_tokens
        window_start = max(0, s - params.n_window + 1)
        window = halo[self._halo_index(window_start, s, q.device)]
        keys, values = torch.cat([window[:, 0], k]), torch.cat([window[:, 1], v])
        o, lse = triangle_attention(q, keys, values, num_tokens=n, q_start=s,
                                    k_start=window_start, params=params, scale=self.scale)
        num_sinks = min(params.n_sink, window_start)
        if num_sinks > 0:
            sinks = halo[self._halo_index(0, num_sinks, q.device)]
            o_s, lse_s = triangle_attention(q, sinks[:, 0].contiguous(),
                                            sinks[:, 1].contiguous(), num_tokens=n, q_start=s,
                                            k_start=0, params=params, scale=self.scale)
            o, _ = merge_attention([o, o_s], [lse, lse_s])
        return o

    def _merge_last_rows(self, q_last, outs, lses) -> torch.Tensor:
        """Exact log-sum-exp merge of every rank's partial result for the last rows."""
        if outs:
            o, lse = merge_attention(outs, lses) if len(outs) > 1 else (outs[0], lses[0])
        else:  # a rank without tokens contributes nothing
            o = torch.zeros_like(q_last)
            lse = torch.full((q_last.shape[1], q_last.shape[0]), -float("inf"),
                             device=q_last.device)
        lse_max = self.comm.all_reduce(lse.clone(), "max").wait()  # finite: key 0 is seen
        weight = torch.exp(lse - lse_max)  # [Hq, T]; 0 where this rank saw no key
        packed = torch.cat([(o.float() * weight.t().unsqueeze(-1)).flatten(), weight.flatten()])
        packed = self.comm.all_reduce(packed, "sum").wait()
        num = packed[:o.numel()].view(o.shape)
        den = packed[o.numel():].view(weight.shape)
        return (num / den.t().unsqueeze(-1)).to(q_last.dtype)

    def _positions(self, device) -> torch.Tensor:
        if "positions" not in self._halo:
            self._halo["positions"] = self.plan.positions(self.rank, device)
        return self._halo["positions"]

    def _boundary_rows(self, device) -> torch.Tensor:
        """Local rows of this rank's boundary block: per chunk slot, its first ``n_sink`` then
        its last ``n_window - 1`` rows (-1 where the chunk is shorter)."""
        if "rows" not in self._halo:
            params = self.trianglemix.params
            rows, offset = [], 0
            for s, e in self.plan.spans(self.rank):
                size = e - s
                head = [offset + i if i < size else -1 for i in range(params.n_sink)]
                num_tail = params.n_window - 1
                tail = [offset + size - num_tail + i if size - num_tail + i >= 0 else -1
                        for i in range(num_tail)]
                rows += head + tail
                offset += size
            self._halo["rows"] = torch.tensor(rows, dtype=torch.int64, device=device)
        return self._halo["rows"]

    def _halo_index(self, start: int, end: int, device) -> torch.Tensor:
        """Rows of the gathered boundary blocks holding positions ``start .. end - 1``: each
        is among the first ``n_sink`` or the last ``n_window - 1`` rows of its chunk."""
        key = ("index", start, end)
        if key not in self._halo:
            params, plan = self.trianglemix.params, self.plan
            head, tail = params.n_sink, params.n_window - 1
            block = head + tail
            index = []
            for p in range(start, end):
                chunk = next(c for c, (s, e) in enumerate(plan.chunk_spans) if s <= p < e)
                s, e = plan.chunk_spans[chunk]
                rank, slot = plan.chunk_rank(chunk)
                base = (rank * 2 + slot) * block
                if p - s < head:
                    index.append(base + p - s)
                else:
                    index.append(base + head + tail - (e - p))
            self._halo[key] = torch.tensor(index, dtype=torch.int64, device=device)
        return self._halo[key]
