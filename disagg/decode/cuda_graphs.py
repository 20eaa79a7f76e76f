"""Pure-decode forwards over persistent buffers, replayed from CUDA graphs.

Life of a decode step here:
1. ``DecodeInputs.stage``: the batch's token ids, positions, new-token slots, context lengths
   and block tables are written into pinned host buffers (a request's block-id row is rebuilt
   only when its ``BlockTable`` changed) and copied to the persistent device buffers in three
   asynchronous transfers from pinned memory; rows past the batch, up to the captured size, are padding (length 0,
   slot -1: nothing stored, nothing read).
2. ``DecodeGraphs.run``: replay the graph captured for that padded size, or, for a size with no
   graph, run the same forward eagerly on the same buffers (same kernels, same split counts).
3. The runner samples the rows of the graph's static logits.
Graphs are captured by ``capture`` (the engine's warm-up), largest batch first, all in one
memory pool: only one is replayed at a time and its logits are consumed before the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from disagg_kernels.paged_decode import pick_num_splits

from disagg.attention.paged import PagedAttention
from disagg.decode.scheduler import ScheduledSequence
from disagg.kv.block_pool import BlockTable
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.llama import LlamaForCausalLM


def graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to ``max_num_seqs`` (vLLM's ladder)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return tuple(sorted({*sizes, max_num_seqs}))


def block_id_row(table: BlockTable) -> np.ndarray:
    """The block ids of ``table`` in token order, as int32."""
    if not table.ranges:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.arange(r.start, r.end, dtype=np.int32) for r in table.ranges])


class DecodeInputs:
    """Persistent device buffers of a pure-decode forward of up to ``max_rows`` sequences, and
    their pinned host staging."""

    def __init__(self, cache: PagedKVCache, max_rows: int):
        self.cache = cache
        self.max_rows = max_rows
        self.max_blocks = cache.num_blocks  # one sequence may hold the whole pool
        device, pin = cache.device, cache.device.type == "cuda"
        # Every host->device copy is of a whole contiguous pinned buffer (or its prefix), so
        # none of them waits for the device.
        # Rows: token id, position, new-token slot, and the row of the previous step's sampled
        # tokens a placeholder token id is taken from (``take_tokens``).
        self._host_tokens = torch.zeros(4, max_rows, dtype=torch.int64, pin_memory=pin)
        self._host_lens = torch.zeros(max_rows, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(max_rows * self.max_blocks, dtype=torch.int32,
                                        pin_memory=pin)  # [n, width] packed, width per step
        self.tokens = torch.zeros(4, max_rows, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self._packed_tables = torch.zeros(max_rows * self.max_blocks, dtype=torch.int32,
                                          device=device)
        self.block_tables = torch.zeros(max_rows, self.max_blocks, dtype=torch.int32,
                                        device=device)
        self._rows: dict[str, tuple[BlockTable, np.ndarray]] = {}
        self._copied = torch.cuda.Event() if pin else None  # the last copies out of staging

    def stage(self, sequences: Sequence[ScheduledSequence], num_rows: int,
              sources: Sequence[int] | None = None) -> None:
        """Fill rows ``0 .. num_rows-1`` for ``sequences`` (one new token each), then padding.
        ``sources``: per row, the row of the previous step's sampled tokens that
        ``take_tokens`` copies in as its token id (for placeholder token ids)."""
        n, bs = len(sequences), self.cache.block_size
        if self._copied is not None:
            # A step that sampled nothing did not wait for the device: let the last copies out
            # of the staging buffers finish before overwriting them (normally long done).
            self._copied.synchronize()
        rows = {}
        for s in sequences:
            cached = self._rows.get(s.request_id)
            if cached is None or cached[0] is not s.block_table:
                cached = (s.block_table, block_id_row(s.block_table))
            rows[s.request_id] = cached
        self._rows = rows
        # Per-row values as arrays (one numpy assignment per field, not per row and field).
        positions = np.fromiter((s.num_computed_tokens for s in sequences), np.int64, n)
        used = (positions + bs) // bs  # blocks holding positions 0 .. pos
        width = int(used.max()) if n else 0
        tables = self._host_tables.numpy()[:n * width].reshape(n, width)
        for b, s in enumerate(sequences):
            tables[b, :used[b]] = rows[s.request_id][1][:used[b]]
        tokens, lens = self._host_tokens.numpy(), self._host_lens.numpy()
        tokens[0, :n] = [s.token_ids[0] for s in sequences]
        tokens[1, :n] = positions
        if n:
            tokens[2, :n] = tables[np.arange(n), positions // bs].astype(np.int64) * bs \
                + positions % bs
        lens[:n] = positions + 1
        tokens[3, :n] = 0 if sources is None else sources
        tokens[0, n:num_rows], tokens[1, n:num_rows], tokens[2, n:num_rows] = 0, 0, -1
        tokens[3, n:num_rows] = 0
        lens[n:num_rows] = 0
        self.tokens.copy_(self._host_tokens, non_blocking=True)
        self.context_lens.copy_(self._host_lens, non_blocking=True)
        if n * width:
            packed = self._packed_tables[:n * width]
            packed.copy_(self._host_tables[:n * width], non_blocking=True)
            self.block_tables[:n, :width].copy_(packed.view(n, width))
        if self._copied is not None:
            self._copied.record()

    def take_tokens(self, num_rows: int, sampled: torch.Tensor) -> None:
        """Token ids of rows ``0 .. num_rows-1`` from ``sampled`` (device int64, the previous
        step's tokens) at the staged source rows, on the device: the host never waits for them."""
        self.tokens[0, :num_rows] = sampled.index_select(0, self.tokens[3, :num_rows])

    def metadata(self, num_rows: int, scale: float) -> PagedAttention:
        """Attention metadata over the first ``num_rows`` rows of the buffers."""
        layout = self.cache.layout
        return PagedAttention(
            self.cache, scale, self.tokens[2, :num_rows], num_rows,
            self.block_tables[:num_rows], self.context_lens[:num_rows],
            num_splits=pick_num_splits(num_rows, layout.num_kv_heads, self.cache.device))


class DecodeGraphs:
    """Pure-decode forward of a padded batch size: from a captured graph or eagerly."""

    def __init__(self, model: LlamaForCausalLM, inputs: DecodeInputs, sizes: Sequence[int]):
        self.model = model
        self.inputs = inputs
        self.sizes = tuple(sorted(sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def captured_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def padded_size(self, num_rows: int) -> int | None:
        """The smallest size >= ``num_rows``; None when the batch is larger than every size."""
        return next((s for s in self.sizes if s >= num_rows), None)

    def forward(self, num_rows: int) -> torch.Tensor:
        """Eager forward of the staged rows: fp32 logits ``[num_rows, V]``."""
        inputs = self.inputs
        meta = inputs.metadata(num_rows, self.model.scale)
        hidden = self.model(inputs.tokens[0, :num_rows], inputs.tokens[1, :num_rows], meta)
        return self.model.compute_logits(hidden)

    def run(self, num_rows: int) -> torch.Tensor:
        graph = self._graphs.get(num_rows)
        if graph is None:
            return self.forward(num_rows)
        graph[0].replay()
        return graph[1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size (rows staged as padding: the captured forwards store and
        read no KV)."""
        self.inputs.stage([], max(self.sizes))
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                for _ in range(2):  # compile kernels, settle the allocator and cuBLAS
                    self.forward(size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = self.forward(size)
                pool = graph.pool()
                self._graphs[size] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
