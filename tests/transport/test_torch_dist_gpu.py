"""The nccl backend between two processes on two GPUs: prefill on cuda:0 (spawned), decode on
cuda:1 (here). Bit-exact bf16 KV in non-contiguous runs over one pairing, including layers of
tens of MiB; a request released mid-transfer leaves the next one intact. The prefill side
frees and overwrites each layer's memory right after handing it over (``torch_dist_peer``).
"""

from __future__ import annotations

import pytest
import torch
from torch_dist_peer import Prefill, Rows, complete, offer, roundtrip, table, unwritten

from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.transport.base import TransferStatus
from disagg.transport.torch_dist import TorchDistKVReceiver

pytestmark = [
    pytest.mark.multi_gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

NUM_LAYERS, BLOCK_SIZE, NUM_BLOCKS = 4, 16, 2048  # 32K rows of 8 x 128 bf16: 64 MiB a layer
ROWS = Rows(row_shape=(8, 128), dtype=torch.bfloat16, device="cuda:0")
DECODE_DEVICE = "cuda:1"
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def prefill():
    p = Prefill("nccl", TIMEOUT_S, ROWS)
    yield p
    p.stop()


@pytest.fixture
def decode():
    torch.cuda.set_device(DECODE_DEVICE)
    layout = KVLayout(NUM_LAYERS, *ROWS.row_shape, ROWS.dtype)
    cache = PagedKVCache(layout, NUM_BLOCKS, BLOCK_SIZE, device=DECODE_DEVICE)
    for t in (*cache.k, *cache.v):
        t.fill_(float("nan"))
    receiver = TorchDistKVReceiver("nccl", device=DECODE_DEVICE, host="127.0.0.1",
                                   timeout_s=TIMEOUT_S)
    receiver.attach(cache)
    yield receiver, cache
    receiver.close()


def test_nccl_kv_bit_exact_over_one_pairing(decode, prefill):
    receiver, cache = decode
    cases = [("a", table((40, 3), (7, 2)), 77), ("b", table((100, 600)), 9_600),
             ("c", table((1500, 500), (5, 2), (900, 61)), 8_999)]
    pairings = {roundtrip(receiver, cache, prefill, rid, blocks, n, seed, ROWS)[3]
                for seed, (rid, blocks, n) in enumerate(cases)}
    assert len(pairings) == 1 and receiver.num_pairings_formed == 1
    assert unwritten(cache, range(5 * BLOCK_SIZE))  # rows of no run stay untouched


def test_nccl_release_mid_transfer_keeps_the_pairing_in_step(decode, prefill):
    receiver, cache = decode
    doomed = offer(receiver, cache, "a", table((10, 64)), 1_000)
    prefill.send("send", doomed.to_list(), 5, NUM_LAYERS, 1)
    assert prefill.reply() == ["paused"]
    receiver.release("a")
    prefill.send("go")
    complete(receiver, doomed, prefill.reply())
    assert receiver.poll("a").status is TransferStatus.ABORTED
    receiver.release("a")
    roundtrip(receiver, cache, prefill, "b", table((200, 70)), 1_100, seed=6, rows=ROWS)
    slots = range(10 * BLOCK_SIZE, 10 * BLOCK_SIZE + 1_000)
    assert unwritten(cache, slots, layers=range(1, NUM_LAYERS))
