"""A prefill call cancelled while (or right after) its object-store writer finishes must not
leave the published KV leased until the lease expires: ``abort`` after ``finish`` releases
the lease it published, and an abort racing a finish leaves no lease whichever wins (the
leak the fault suite's early leavers found: one lease held to its 60 s expiry)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch
from helpers import small_ray

from disagg.kv.layout import KVFingerprint
from disagg.transport.base import KVHeader, KVTransferAborted
from disagg.transport.ray_object_store import RayObjectStoreKVReceiver, RayObjectStoreKVSender

NUM_LAYERS, NUM_TOKENS = 3, 10
RUNS = ((0, 0, NUM_TOKENS),)
LIVENESS_S = 60.0


@pytest.fixture(scope="module")
def sender():
    with small_ray():
        s = RayObjectStoreKVSender(lease_s=LIVENESS_S * 10)  # never expires during the test
        yield s
        s.close()


def _written(sender, request_id: str):
    dest = RayObjectStoreKVReceiver().destination(request_id, RUNS, NUM_TOKENS,
                                                  ttl_s=LIVENESS_S)
    writer = sender.open(dest, num_layers=NUM_LAYERS)
    for layer in range(NUM_LAYERS):
        writer.write_layer(layer, torch.ones(NUM_TOKENS, 2, 4), torch.ones(NUM_TOKENS, 2, 4))
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
