"""Both ends of the torch.distributed KV tests. Prefill is a spawned process (``Prefill``)
running a ``TorchDistKVSender`` on scripted commands from a pipe (plain lists only); decode
is the test process, with the helpers below.

Commands and replies:
- ``["send", destination_list, seed, num_layers, pause_at]``: open a writer, write layers
  ``0 .. pause_at - 1``, reply ``["paused"]`` and wait for ``["go"]`` (when ``pause_at`` is not
  None), write the rest and finish; reply ``["done", num_bytes, num_layers, pairings_formed]``
  or ``["error", exception type name, message]``.
- ``["abort", destination_list, seed, num_layers, after]``: write ``after`` layers, then abort;
  reply ``["aborted"]``.
- ``["interleave", [destination_list, ...], [seed, ...], num_layers, None]``: one writer per
  destination, open together, layers written in turn; reply ``["done", ...]`` of the last.
- ``["stop"]``: close the sender and exit.

On a GPU, each layer is made on the device and, once handed over, its memory goes back to the
allocator and is overwritten at once by NaN tensors of the same size: the writer must keep
alive what it still sends, as a prefill model frees each layer's K/V.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from disagg.kv.block_pool import BlockRange, BlockTable
from disagg.kv.layout import KVFingerprint
from disagg.transport.base import KVCompletion, KVDestination, KVHeader, TransferStatus
from disagg.transport.torch_dist import TorchDistKVSender

NUM_KV_HEADS, HEAD_DIM = 2, 4
LIVENESS_S = 60.0  # a spawned process imports torch first: slow on a loaded machine


@dataclass(frozen=True)
class Rows:
    """What one token's K (or V) row is: shape, dtype, device."""

    row_shape: tuple[int, int] = (NUM_KV_HEADS, HEAD_DIM)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


def layer_kv(seed: int, layer: int, num_tokens: int, rows: Rows = Rows()
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V a prefill would compute for ``layer`` (deterministic in both processes)."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    shape = (num_tokens, *rows.row_shape)
    return tuple(torch.randn(shape, generator=g).to(rows.dtype).to(rows.device)
                 for _ in range(2))


def header(destination: KVDestination) -> KVHeader:
    fingerprint = KVFingerprint("test", "torch.float32", "layout", "dense",
                                destination.num_prompt_tokens)
    return KVHeader(destination.request_id, fingerprint, first_token_id=1)


def _write(sender, conn, rows: Rows, destination, seed, num_layers, pause_at, stop_at=None):
    writer = sender.open(destination, num_layers=num_layers)
    for layer in range(num_layers if stop_at is None else stop_at):
        if layer == pause_at:
            conn.send(["paused"])
            assert conn.recv() == ["go"]
        k, v = layer_kv(seed, layer, destination.num_prompt_tokens, rows)
        writer.write_layer(layer, k, v)
        if k.is_cuda:
            shape = k.shape
            del k, v
            clobber = [torch.full(shape, float("nan"), dtype=rows.dtype, device=rows.device)
                       for _ in range(2)]
            del clobber
    return writer


def _interleave(sender, rows: Rows, dest_lists, seeds, num_layers: int) -> list:
    dests = [KVDestination.from_list(d) for d in dest_lists]
    writers = [sender.open(d, num_layers=num_layers) for d in dests]
    for layer in range(num_layers):
        for d, w, seed in zip(dests, writers, seeds):
            w.write_layer(layer, *layer_kv(seed, layer, d.num_prompt_tokens, rows))
    completions = [w.finish(header(d)) for d, w in zip(dests, writers)]
    return ["done", completions[-1].num_bytes, num_layers, sender.num_pairings_formed]


def serve(conn, backend: str, timeout_s: float, rows: Rows = Rows()) -> None:
    if rows.device != "cpu":
        torch.cuda.set_device(rows.device)
    sender = TorchDistKVSender(backend, device=rows.device, timeout_s=timeout_s)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            sender.close()
            return
        op, dest_list, seed, num_layers, at = cmd
        try:
            if op == "interleave":
                conn.send(_interleave(sender, rows, dest_list, seed, num_layers))
                continue
            destination = KVDestination.from_list(dest_list)
            if op == "abort":
                _write(sender, conn, rows, destination, seed, num_layers, None, at).abort()
                conn.send(["aborted"])
                continue
            writer = _write(sender, conn, rows, destination, seed, num_layers, at)
            completion = writer.finish(header(destination))
            conn.send(["done", completion.num_bytes, completion.num_layers,
                       sender.num_pairings_formed])
        except Exception as e:  # noqa: BLE001 (the test asserts on what was raised)
            conn.send(["error", type(e).__name__, str(e)])


class Prefill:
    """A spawned prefill process and its command pipe."""

    def __init__(self, backend: str, timeout_s: float, rows: Rows = Rows()):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, backend, timeout_s, rows),
                                daemon=True)
        self.proc.start()

    def send(self, *cmd) -> None:
        self.conn.send(list(cmd))

    def reply(self) -> list:
        assert self.conn.poll(LIVENESS_S), "the prefill process did not answer"
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.send("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def table(*ranges: tuple[int, int]) -> BlockTable:
    return BlockTable(tuple(BlockRange(start, n) for start, n in ranges))


def offer(receiver, cache, rid: str, blocks: BlockTable, num_tokens: int,
          ttl_s: float = 60.0) -> KVDestination:
    runs = tuple(blocks.slot_runs(cache.block_size, 0, num_tokens))
    return receiver.destination(rid, runs, num_tokens, ttl_s=ttl_s)


def complete(receiver, dest: KVDestination, reply: list) -> None:
    assert reply[0] == "done", reply
    receiver.complete(KVCompletion(header(dest), receiver.backend, reply[1], reply[2], 0.0))


def finished(receiver, rid: str):
    """Poll until the transfer is no longer pending (a liveness deadline)."""
    deadline = time.monotonic() + LIVENESS_S
    while (result := receiver.poll(rid)).status is TransferStatus.PENDING:
        assert time.monotonic() < deadline, f"{rid} still pending"
        time.sleep(0.005)
    return result


def assert_kv(cache, blocks: BlockTable, num_tokens: int, seed: int, rows: Rows) -> None:
    packed = cache.read_packed(blocks, num_tokens)
    for layer in range(cache.layout.num_layers):
        k, v = layer_kv(seed, layer, num_tokens, Rows(rows.row_shape, rows.dtype))
        assert torch.equal(packed.k[layer].cpu(), k), layer
        assert torch.equal(packed.v[layer].cpu(), v), layer


def roundtrip(receiver, cache, prefill: Prefill, rid: str, blocks: BlockTable, num_tokens: int,
              seed: int, rows: Rows = Rows()) -> list:
    """One whole request: offer, prefill writes every layer, complete, DONE, bit-exact."""
    dest = offer(receiver, cache, rid, blocks, num_tokens)
    prefill.send("send", dest.to_list(), seed, cache.layout.num_layers, None)
    reply = prefill.reply()
    # Whatever has arrived, KV without its completion record is never usable.
    assert receiver.poll(rid).status is TransferStatus.PENDING
    complete(receiver, dest, reply)
    assert finished(receiver, rid).status is TransferStatus.DONE
    assert_kv(cache, blocks, num_tokens, seed, rows)
    receiver.release(rid)
    return reply


def unwritten(cache, slots: range, layers: range | None = None) -> bool:
    """Whether rows ``slots`` still hold the NaN the test poisoned the pool with."""
    layers = range(cache.layout.num_layers) if layers is None else layers
    return all(torch.isnan(t[slots.start:slots.stop]).all()
               for layer in layers for t in (cache.k[layer], cache.v[layer]))
