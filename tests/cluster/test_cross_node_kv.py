"""A prefill replica maps a decode pool's CUDA IPC export only when that pool is on its own
node: decode sends the export with every call, and on another node its handles cannot open."""

from __future__ import annotations

from disagg.transport.base import KVDestination
from disagg.transport.direct import CUDA_IPC, DirectKVSender
from disagg.transport.ray_object_store import BACKEND as OBJECT_STORE


def _offer(backend: str, node: str) -> KVDestination:
    return KVDestination("r", backend, f"{backend}:x", ((0, 0, 4),), 4, 1e18, node)


def test_only_a_cuda_ipc_offer_from_this_node_counts():
    sender = DirectKVSender(CUDA_IPC, "node-a")
    assert sender.on_this_node((_offer(CUDA_IPC, "node-a"), _offer(OBJECT_STORE, "")))
    assert not sender.on_this_node((_offer(CUDA_IPC, "node-b"), _offer(OBJECT_STORE, "")))
    assert not sender.on_this_node((_offer(OBJECT_STORE, "node-a"),))
    assert not sender.on_this_node(())
