"""The torch.distributed KV backend on CPU (gloo) between two real processes.

Decode runs here (a small ``PagedKVCache`` poisoned with NaN, so an unwritten row shows);
prefill runs in a spawned process (``torch_dist_peer``) that writes scripted layers. Every
wait below is a liveness deadline, far above what the step needs: none is a speed threshold.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch_dist_peer as peer
from torch_dist_peer import (
    LIVENESS_S,
    Prefill,
    complete,
    finished,
    offer,
    roundtrip,
    table,
    unwritten,
)

from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.transport.base import KVCompletion, TransferStatus
from disagg.transport.torch_dist import TorchDistKVReceiver, TorchDistKVSender

NUM_LAYERS, BLOCK_SIZE, NUM_BLOCKS = 3, 4, 16
TIMEOUT_S = 5.0  # the backend's own timeout on both sides


@pytest.fixture(scope="module")
def prefill():
    p = Prefill("gloo", TIMEOUT_S)
    yield p
    p.stop()


def poisoned_cache() -> PagedKVCache:
    layout = KVLayout(NUM_LAYERS, peer.NUM_KV_HEADS, peer.HEAD_DIM, torch.float32)
    cache = PagedKVCache(layout, NUM_BLOCKS, BLOCK_SIZE)
    for t in (*cache.k, *cache.v):
        t.fill_(float("nan"))
    return cache


@pytest.fixture
def decode():
    cache = poisoned_cache()
    receiver = TorchDistKVReceiver("gloo", host="127.0.0.1", timeout_s=TIMEOUT_S)
    receiver.attach(cache)
    yield receiver, cache
    receiver.close()


def test_kv_arrives_bit_exact_in_non_contiguous_runs_over_one_pairing(decode, prefill):
    receiver, cache = decode
    cases = [("a", table((5, 2), (1, 1)), 11), ("b", table((9, 3)), 12),
             ("c", table((14, 1), (0, 1), (12, 2)), 13)]
    pairings = {roundtrip(receiver, cache, prefill, rid, blocks, n, seed)[3]
                for seed, (rid, blocks, n) in enumerate(cases)}
    assert len(pairings) == 1  # the sender formed no pairing after the first request
    assert receiver.num_pairings_formed == 1
    used = {s for _, blocks, n in cases for s0, _, m in blocks.slot_runs(BLOCK_SIZE, 0, n)
            for s in range(s0, s0 + m)}
    for slot in set(range(NUM_BLOCKS * BLOCK_SIZE)) - used:  # nothing outside the runs
        assert unwritten(cache, range(slot, slot + 1))


def test_two_writers_interleaved_on_one_pairing(decode, prefill):
    receiver, cache = decode
    blocks = [table((0, 2)), table((5, 1), (3, 1))]
    dests = [offer(receiver, cache, rid, b, 7) for rid, b in zip("pq", blocks)]
    prefill.send("interleave", [d.to_list() for d in dests], [11, 12], NUM_LAYERS, None)
    reply = prefill.reply()
    for dest, b, seed in zip(dests, blocks, [11, 12]):
        complete(receiver, dest, reply)
        assert finished(receiver, dest.request_id).status is TransferStatus.DONE
        peer.assert_kv(cache, b, 7, seed, peer.Rows())


def test_release_mid_transfer_keeps_the_pairing_in_step(decode, prefill):
    receiver, cache = decode
    doomed = offer(receiver, cache, "a", table((2, 3)), 10)  # slots 8..17
    prefill.send("send", doomed.to_list(), 5, NUM_LAYERS, 1)
    assert prefill.reply() == ["paused"]
    polled = []
    poller = threading.Thread(target=lambda: polled.append(receiver.poll("a")))
    poller.start()
    poller.join(LIVENESS_S)  # layers are outstanding: poll still answers at once
    assert polled and polled[0].status is TransferStatus.PENDING
    receiver.release("a")
    prefill.send("go")
    reply = prefill.reply()  # decode drained the rest: the writer finishes normally
    complete(receiver, doomed, reply)
    assert receiver.poll("a").status is TransferStatus.ABORTED
    receiver.release("a")
    roundtrip(receiver, cache, prefill, "b", table((8, 2), (0, 1)), 9, seed=6)
    assert unwritten(cache, range(8, 18), layers=range(1, NUM_LAYERS))  # went to scratch
    assert receiver.num_pairings_formed == 1


def test_abort_by_prefill_ends_the_transfer_aborted(decode, prefill):
    receiver, cache = decode
    dest = offer(receiver, cache, "x", table((3, 2)), 6)
    prefill.send("abort", dest.to_list(), 4, NUM_LAYERS, 1)
    assert prefill.reply() == ["aborted"]
    assert finished(receiver, "x").status is TransferStatus.ABORTED
    receiver.release("x")
    roundtrip(receiver, cache, prefill, "y", table((6, 2)), 7, seed=7)


def test_writer_refuses_an_expired_destination(decode, prefill):
    receiver, cache = decode
    roundtrip(receiver, cache, prefill, "warm", table((0, 1)), 3, seed=1)
    old = offer(receiver, cache, "old", table((3, 1)), 4, ttl_s=-1.0)
    prefill.send("send", old.to_list(), 2, NUM_LAYERS, None)
    assert prefill.reply()[:2] == ["error", "KVTransferAborted"]
    assert receiver.poll("old").status is TransferStatus.EXPIRED
    assert unwritten(cache, range(12, 16))

    mid = offer(receiver, cache, "mid", table((4, 1)), 4, ttl_s=2.5)  # slots 16..19
    prefill.send("send", mid.to_list(), 3, NUM_LAYERS, 1)
    assert prefill.reply() == ["paused"]
    time.sleep(max(mid.expires_at - time.time(), 0.0) + 0.05)
    prefill.send("go")
    assert prefill.reply()[:2] == ["error", "KVTransferAborted"]  # layer 1 never started
    assert receiver.poll("mid").status is TransferStatus.EXPIRED
    assert unwritten(cache, range(16, 20), layers=range(1, NUM_LAYERS))
    roundtrip(receiver, cache, prefill, "next", table((7, 2)), 8, seed=4)
    assert receiver.num_pairings_formed == 1


def test_killed_sender_fails_its_transfer_and_spares_other_pairings(decode, prefill):
    receiver, cache = decode
    roundtrip(receiver, cache, prefill, "before", table((0, 2)), 5, seed=1)
    doomed = Prefill("gloo", TIMEOUT_S)
    try:
        dest = offer(receiver, cache, "k", table((6, 2)), 8, ttl_s=600.0)
        doomed.send("send", dest.to_list(), 9, NUM_LAYERS, 1)
        assert doomed.reply() == ["paused"]
        doomed.proc.kill()
        doomed.proc.join(10)
        # Within its deadline (far inside the 600 s expiry), and FAILED, not EXPIRED.
        result = finished(receiver, "k")
        assert result.status is TransferStatus.FAILED, result
    finally:
        doomed.stop()
    roundtrip(receiver, cache, prefill, "after", table((10, 2)), 6, seed=2)
    assert receiver.num_pairings_formed == 2


def test_hung_sender_breaks_the_pairing_by_its_deadline_and_the_next_open_pairs_anew(prefill):
    cache = poisoned_cache()
    receiver = TorchDistKVReceiver("gloo", host="127.0.0.1", timeout_s=1.0)
    receiver.attach(cache)
    try:
        roundtrip(receiver, cache, prefill, "warm", table((0, 1)), 3, seed=1)
        stuck = offer(receiver, cache, "stuck", table((2, 1)), 4, ttl_s=0.5)
        prefill.send("send", stuck.to_list(), 2, NUM_LAYERS, 1)
        assert prefill.reply() == ["paused"]  # the sender stalls with layers outstanding
        assert finished(receiver, "stuck").status is TransferStatus.EXPIRED
        deadline = time.monotonic() + LIVENESS_S  # decode gives up at expiry + timeout_s
        while receiver.num_pairings:
            assert time.monotonic() < deadline, "decode still waits for the stalled sender"
            time.sleep(0.01)
        prefill.send("go")
        assert prefill.reply()[:2] == ["error", "KVTransferAborted"]
        roundtrip(receiver, cache, prefill, "next", table((4, 2)), 7, seed=2)
        assert receiver.num_pairings_formed == 2
    finally:
        receiver.close()


def test_close_ends_idle_pairings(prefill):
    cache = poisoned_cache()
    receiver = TorchDistKVReceiver("gloo", host="127.0.0.1", timeout_s=TIMEOUT_S)
    receiver.attach(cache)
    roundtrip(receiver, cache, prefill, "r", table((1, 1)), 2, seed=3)
    assert receiver.num_pairings == 1
    receiver.close()  # wakes the idle receiving thread out of its store wait
    assert receiver.num_pairings == 0


def test_protocol_edges_without_a_peer():
    with pytest.raises(ValueError):
        TorchDistKVSender("mpi")
    sender = TorchDistKVSender("gloo")
    cache = poisoned_cache()
    receiver = TorchDistKVReceiver("gloo", host="127.0.0.1", timeout_s=TIMEOUT_S)
    receiver.attach(cache)
    try:
        a = offer(receiver, cache, "a", table((0, 1)), 4)
        b = offer(receiver, cache, "b", table((1, 1)), 4, ttl_s=-1.0)
        assert a.transfer_id != b.transfer_id and a.endpoint.startswith("127.0.0.1:")
        assert sender.accepts(a) and not TorchDistKVSender("nccl").accepts(a)
        assert sender.leased() == (0, 0)
        assert receiver.poll("a").status is TransferStatus.PENDING
        assert receiver.poll("b").status is TransferStatus.EXPIRED
        assert receiver.poll("unknown").status is TransferStatus.PENDING
        receiver.complete(KVCompletion(peer.header(a), "gloo", 0, NUM_LAYERS - 1, 0.0))
        assert receiver.poll("a").status is TransferStatus.FAILED  # a layer count mismatch
        receiver.release("a")
        receiver.complete(KVCompletion(peer.header(a), "gloo", 0, NUM_LAYERS, 0.0))
        assert receiver.poll("a").status is TransferStatus.ABORTED  # no destination any more
    finally:
        receiver.close()
