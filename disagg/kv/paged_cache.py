"""The decode side's paged KV storage: per layer one K and one V tensor of token rows.

``k[layer]`` and ``v[layer]`` are ``[num_blocks * block_size, Hkv, D]`` (the layout of
``kv/layout.py``); cache row ("slot") ``b * block_size + i`` is row i of block b. Which rows
belong to which request is the ``BlockPool``'s business; this class only moves rows:

1. ``write_runs`` copies one layer of a received prompt KV into a destination's row runs, one
   copy per contiguous block range (``write_packed``: every layer of a ``PackedKV``).
2. ``slot_mapping`` gives the cache rows of a request's token positions; the attention metadata
   stores new K/V there and gathers keys from there.
"""

from __future__ import annotations

import torch

from disagg.errors import KVMismatchError, KVPoolMemoryError
from disagg.kv.block_pool import BlockTable
from disagg.kv.layout import KVLayout, PackedKV


class PagedKVCache:
    """K/V rows of every block of the pool, one contiguous tensor per layer (views of one
    allocation: a prefill process maps the whole pool with one CUDA IPC handle, not one per
    layer and side)."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu"):
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (num_blocks * block_size, *layout.row_shape)
        try:
            storage = torch.zeros((2, layout.num_layers, *shape), dtype=layout.dtype,
                                  device=device)
        except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; the CPU allocator: "allocate"
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            raise KVPoolMemoryError(
                f"a KV pool of {num_blocks} blocks ({self.num_bytes / 2**30:.2f} GiB) does not "
                f"fit on {self.device}{free_memory_note(self.device)}: ask for a smaller "
                "pool") from e
        self.k = list(storage[0].unbind(0))
        self.v = list(storage[1].unbind(0))

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.layout.bytes_per_token

    def slot_mapping(self, block_table: BlockTable, start: int, end: int) -> torch.Tensor:
        """Cache rows of token positions ``[start, end)``: a long tensor ``[end - start]``."""
        runs = block_table.slot_runs(self.block_size, start, end)
        if not runs:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat([torch.arange(s, s + n, device=self.device) for s, _, n in runs])

    def write_packed(self, block_table: BlockTable, packed: PackedKV) -> None:
        """Copy a prompt's KV (positions ``0 .. N-1``) into ``block_table``'s rows."""
        self._check(packed)
        runs = block_table.slot_runs(self.block_size, 0, packed.num_tokens)
        for layer in range(self.layout.num_layers):
            self.write_runs(layer, runs, packed.k[layer], packed.v[layer])

    def write_runs(self, layer: int, runs, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy one layer's prompt rows ``k``, ``v`` ``[N, Hkv, D]`` into cache rows given as
        runs ``(slot_start, token_start, num_tokens)`` (a KV destination's)."""
        if k.shape[1:] != self.layout.row_shape or v.shape != k.shape:
            raise KVMismatchError(f"received rows of shape {tuple(k.shape[1:])}; this cache "
                                  f"holds rows of {self.layout.row_shape}")
        for slot, token, n in runs:
            self.k[layer][slot:slot + n].copy_(k[token:token + n])
            self.v[layer][slot:slot + n].copy_(v[token:token + n])

    def read_packed(self, block_table: BlockTable, num_tokens: int) -> PackedKV:
        """The KV of positions ``0 .. num_tokens-1`` as a ``PackedKV`` (a copy)."""
        packed = PackedKV.empty(self.layout, num_tokens, self.device)
        for slot, token, n in block_table.slot_runs(self.block_size, 0, num_tokens):
            for layer in range(self.layout.num_layers):
                packed.k[layer][token:token + n].copy_(self.k[layer][slot:slot + n])
                packed.v[layer][token:token + n].copy_(self.v[layer][slot:slot + n])
        return packed

    def _check(self, packed: PackedKV) -> None:
        expected = (self.layout.num_layers, self.layout.row_shape, self.layout.dtype)
        tensors = (*packed.k, *packed.v)
        got = (len(packed.k), tuple(packed.k[0].shape[1:]) if packed.k else (), packed.k[0].dtype
               if packed.k else None)
        same_rows = len(packed.v) == len(packed.k) and all(
            t.shape == tensors[0].shape and t.dtype == tensors[0].dtype for t in tensors)
        if got != expected or not same_rows:
            raise KVMismatchError(
                f"received KV has {got[0]} layers of rows {got[1]} in {got[2]}; this cache "
                f"holds {expected[0]} layers of rows {expected[1]} in {expected[2]}")


def free_memory_note(device: torch.device) -> str:
    """", where X of Y GiB are free" on CUDA (every process's use counted), else ""."""
    if device.type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(device)
    return f", where {free / 2**30:.2f} of {total / 2**30:.2f} GiB are free"
