"""Published object-store KV must not stay leased until the lease expires when nobody will
pull it: a prefill call cancelled while (or right after) its writer finishes -- ``abort``
after ``finish`` releases the lease it published, and an abort racing a finish leaves no lease
whichever wins (the leak the fault suite's early leavers found: one lease held to its 60 s
expiry) -- and a decode replica that dies after the publish, before its pull: the lease
keeper ends the leases of a destination owner that is gone (the decode-kill runs held one to
its expiry, 53 s)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from helpers import small_ray

from disagg.kv.layout import KVFingerprint
from disagg.transport.base import KVDestination, KVHeader, KVTransferAborted
from disagg.transport.ray_object_store import RayObjectStoreKVReceiver, RayObjectStoreKVSender

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, NUM_TOKENS = 3, 2, 4, 10
RUNS = ((0, 0, NUM_TOKENS),)
LIVENESS_S = 60.0
LEASE_S = LIVENESS_S * 10  # never expires during the test


@pytest.fixture(scope="module")
def sender():
    with small_ray():
        s = RayObjectStoreKVSender(lease_s=LEASE_S)
        yield s
        s.close()


def _written(sender, request_id: str, dest: KVDestination | None = None):
    dest = dest or RayObjectStoreKVReceiver().destination(request_id, RUNS, NUM_TOKENS,
                                                          ttl_s=LIVENESS_S)
    writer = sender.open(dest, num_layers=NUM_LAYERS)
    shape = (NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM)
    for layer in range(NUM_LAYERS):
        writer.write_layer(layer, torch.ones(shape), torch.ones(shape))
    header = KVHeader(request_id, KVFingerprint("test", "x", "layout", "dense", NUM_TOKENS), 1)
    return writer, header


def _wait_leases(sender, expected: int) -> None:
    end = time.monotonic() + LIVENESS_S  # releases are fire-and-forget actor calls
    while sender.leased()[0] != expected:
        assert time.monotonic() < end, f"leases stuck at {sender.leased()}"
        time.sleep(0.02)


def test_abort_after_finish_releases_the_published_lease(sender):
    writer, header = _written(sender, "finished-then-cancelled")
    writer.finish(header)
    assert sender.leased()[0] == 1
    writer.abort()
    _wait_leases(sender, 0)
    writer.abort()  # idempotent
    _wait_leases(sender, 0)


@pytest.mark.parametrize("attempt", range(3))
def test_abort_racing_finish_leaves_no_lease(sender, attempt):
    writer, header = _written(sender, f"race-{attempt}")
    outcome = []

    def finish():
        try:
            outcome.append(writer.finish(header))
        except (KVTransferAborted, CancelledError) as e:  # aborted first: its puts cancelled
            outcome.append(e)

    thread = threading.Thread(target=finish)
    thread.start()
    writer.abort()
    thread.join(LIVENESS_S)
    assert outcome, "finish never returned"
    _wait_leases(sender, 0)


def test_a_decode_replica_dying_before_its_pull_ends_its_leases_at_once(sender):
    """Two decode stand-ins (named actors, each its destinations' owner) each get a lease;
    one dies before pulling. Its lease ends long before the lease expiry (``LEASE_S``: 10x
    the deadline here), counted as orphaned; the other's lease is kept and pulled."""
    import fault_fakes
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(fault_fakes)  # workers cannot import tests/
    puller = ray.remote(num_cpus=0)(fault_fakes.LeasePuller)
    doomed, alive = (puller.options(name=f"lease-puller-{i}", namespace="faults").remote(
        NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM) for i in range(2))
    completions = {}
    for name, actor in (("doomed", doomed), ("alive", alive)):
        dest = KVDestination.from_list(ray.get(actor.destination.remote(
            name, RUNS, NUM_TOKENS, LIVENESS_S), timeout=LIVENESS_S))
        assert dest.owner.startswith("faults/lease-puller-")
        writer, header = _written(sender, name, dest)
        completions[name] = writer.finish(header)
    orphaned_before = sender.num_orphaned()
    assert sender.leased()[0] == 2
    ray.kill(doomed, no_restart=True)  # dies between the publish and its pull
    _wait_leases(sender, 1)
    assert sender.num_orphaned() - orphaned_before == 1
    status = ray.get(alive.pull.remote(completions["alive"], LIVENESS_S), timeout=2 * LIVENESS_S)
    assert status == "done"
    _wait_leases(sender, 0)
    ray.kill(alive)
