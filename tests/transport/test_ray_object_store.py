"""The Ray object-store KV backend (the portable production transport) on its own: prefill's
writer puts each layer, its lease keeper holds the objects, decode's receiver polls them in
and copies them into non-contiguous cache rows bit-exactly; leases end on every exit path
(copied, expired, aborted, unknown request). Every wait is a liveness deadline, not a speed
bound."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import small_ray

from disagg.kv.layout import KVFingerprint, KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.transport.base import KVHeader, KVTransferAborted, TransferStatus
from disagg.transport.ray_object_store import RayObjectStoreKVReceiver, RayObjectStoreKVSender

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 3, 2, 4, 4, 16
LIVENESS_S = 60.0
RUNS = ((20, 0, 5), (4, 5, 3), (40, 8, 2))  # (slot_start, token_start, num_tokens): 10 tokens
NUM_TOKENS = 10


@pytest.fixture(scope="module")
def ray_instance():
    with small_ray():
        yield


@pytest.fixture
def sender(ray_instance):
    s = RayObjectStoreKVSender(lease_s=60.0)
    yield s
    s.close()


class FakeClock:
    def __init__(self):
        self.now = time.time()  # destinations also check expiry against the wall clock

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def receiver(ray_instance, clock):
    r = RayObjectStoreKVReceiver(clock=clock)
    r.attach(_cache(torch.float32))
    yield r
    r.close()


def _cache(dtype: torch.dtype) -> PagedKVCache:
    cache = PagedKVCache(KVLayout(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, dtype), NUM_BLOCKS,
                         BLOCK_SIZE)
    for t in (*cache.k, *cache.v):
        t.fill_(float("nan"))  # an unwritten row shows
    return cache


def _layers(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
                  for _ in range(2)) for _ in range(NUM_LAYERS)]


def _header(request_id: str) -> KVHeader:
    return KVHeader(request_id, KVFingerprint("test", "x", "layout", "dense", NUM_TOKENS), 1)


def _publish(sender, dest, layers):
    writer = sender.open(dest, num_layers=NUM_LAYERS)
    for i, (k, v) in enumerate(layers):
        writer.write_layer(i, k, v)
    return writer.finish(_header(dest.request_id))


def _poll_until_finished(receiver, request_id: str):
    end = time.monotonic() + LIVENESS_S
    while (result := receiver.poll(request_id)).status is TransferStatus.PENDING:
        assert time.monotonic() < end, "the transfer never finished"
        time.sleep(0.01)
    return result


def _wait_leases(sender, expected: int) -> None:
    end = time.monotonic() + LIVENESS_S  # releases are fire-and-forget actor calls
    while sender.leased()[0] != expected:
        assert time.monotonic() < end, f"leases stuck at {sender.leased()}"
        time.sleep(0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_arrives_bit_exact_in_its_runs_and_the_lease_ends(sender, dtype):
    cache, receiver = _cache(dtype), RayObjectStoreKVReceiver()
    receiver.attach(cache)
    try:
        dest = receiver.destination("r", RUNS, NUM_TOKENS, ttl_s=LIVENESS_S)
        layers = _layers(dtype)
        completion = _publish(sender, dest, layers)
        nbytes = NUM_LAYERS * 2 * NUM_TOKENS * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
        assert completion.num_bytes == nbytes and sender.leased() == (1, nbytes)
        receiver.complete(completion)
        assert _poll_until_finished(receiver, "r").status is TransferStatus.DONE
        written = set()
        for layer, (k, v) in enumerate(layers):
            for slot, token, n in RUNS:
                assert torch.equal(cache.k[layer][slot:slot + n], k[token:token + n])
                assert torch.equal(cache.v[layer][slot:slot + n], v[token:token + n])
                written |= set(range(slot, slot + n))
        others = [s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in written]
        assert cache.k[0][others].isnan().all() and cache.v[-1][others].isnan().all()
        _wait_leases(sender, 0)
    finally:
        receiver.close()


def test_an_expired_destination_ends_expired_and_frees_the_lease(sender, receiver, clock):
    dest = receiver.destination("late", RUNS, NUM_TOKENS, ttl_s=5.0)
    receiver.complete(_publish(sender, dest, _layers(torch.float32)))
    clock.now += 5.0
    assert receiver.poll("late").status is TransferStatus.EXPIRED
    _wait_leases(sender, 0)


def test_a_completion_for_an_unknown_request_is_aborted_and_released(sender, receiver):
    dest = RayObjectStoreKVReceiver().destination("ghost", RUNS, NUM_TOKENS, ttl_s=LIVENESS_S)
    receiver.complete(_publish(sender, dest, _layers(torch.float32)))  # never offered here
    assert receiver.poll("ghost").status is TransferStatus.ABORTED
    _wait_leases(sender, 0)


def test_released_before_copy_frees_the_lease(sender, receiver):
    dest = receiver.destination("gone", RUNS, NUM_TOKENS, ttl_s=LIVENESS_S)
    receiver.complete(_publish(sender, dest, _layers(torch.float32)))
    receiver.release("gone")  # the request was cancelled
    assert receiver.poll("gone").status is TransferStatus.PENDING  # forgotten
    _wait_leases(sender, 0)


def test_an_aborted_writer_refuses_layers_and_publishes_nothing(sender, receiver):
    dest = receiver.destination("cut", RUNS, NUM_TOKENS, ttl_s=LIVENESS_S)
    k, v = _layers(torch.float32)[0]
    writer = sender.open(dest, num_layers=NUM_LAYERS)
    writer.write_layer(0, k, v)
    writer.abort()
    with pytest.raises(KVTransferAborted):
        writer.write_layer(1, k, v)
    with pytest.raises(KVTransferAborted):
        writer.finish(_header("cut"))
    assert sender.leased() == (0, 0)


def test_unpulled_kv_is_dropped_when_its_lease_expires(ray_instance):
    sender = RayObjectStoreKVSender(lease_s=0.2)
    try:
        dest = RayObjectStoreKVReceiver().destination("orphan", RUNS, NUM_TOKENS,
                                                      ttl_s=LIVENESS_S)
        _publish(sender, dest, _layers(torch.float32))  # decode never pulls it
        _wait_leases(sender, 0)
    finally:
        sender.close()
