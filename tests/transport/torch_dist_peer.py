"""The prefill side of the torch.distributed KV tests: a spawned process running a
``TorchDistKVSender`` on scripted commands from a pipe (plain lists only).

Commands and replies:
- ``["send", destination_list, seed, num_layers, pause_at]``: open a writer, write layers
  ``0 .. pause_at - 1``, reply ``["paused"]`` and wait for ``["go"]`` (when ``pause_at`` is not
  None), write the rest and finish; reply ``["done", num_bytes, num_layers, pairings_formed]``
  or ``["error", exception type name, message]``.
- ``["abort", destination_list, seed, num_layers, after]``: write ``after`` layers, then abort;
  reply ``["aborted"]``.
- ``["stop"]``: close the sender and exit.
"""

from __future__ import annotations

import torch

from disagg.kv.layout import KVFingerprint
from disagg.transport.base import KVDestination, KVHeader
from disagg.transport.torch_dist import TorchDistKVSender

NUM_KV_HEADS, HEAD_DIM = 2, 4


def layer_kv(seed: int, layer: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V a prefill would compute for ``layer`` (deterministic in both processes)."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    shape = (num_tokens, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def header(destination: KVDestination) -> KVHeader:
    fingerprint = KVFingerprint("test", "torch.float32", "layout", "dense",
                                destination.num_prompt_tokens)
    return KVHeader(destination.request_id, fingerprint, first_token_id=1)


def _write(sender, conn, destination, seed, num_layers, pause_at, stop_at=None):
    writer = sender.open(destination, num_layers=num_layers)
    for layer in range(num_layers if stop_at is None else stop_at):
        if layer == pause_at:
            conn.send(["paused"])
            assert conn.recv() == ["go"]
        writer.write_layer(layer, *layer_kv(seed, layer, destination.num_prompt_tokens))
    return writer


def serve(conn, backend: str, timeout_s: float) -> None:
    sender = TorchDistKVSender(backend, timeout_s=timeout_s)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            sender.close()
            return
        op, dest_list, seed, num_layers, at = cmd
        destination = KVDestination.from_list(dest_list)
        try:
            if op == "abort":
                writer = _write(sender, conn, destination, seed, num_layers, None, stop_at=at)
                writer.abort()
                conn.send(["aborted"])
                continue
            completion = _write(sender, conn, destination, seed, num_layers, at).finish(
                header(destination))
            conn.send(["done", completion.num_bytes, completion.num_layers,
                       sender.num_pairings_formed])
        except Exception as e:  # noqa: BLE001 (the test asserts on what was raised)
            conn.send(["error", type(e).__name__, str(e)])
