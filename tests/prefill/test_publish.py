"""Prefill publishes KV under leases; the in-process transport pulls it bit-exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from disagg.kv.layout import KVFingerprint
from disagg.prefill.engine import PrefillBusyError, PrefillConfig, PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.base import KVHeader, TransferStatus
from disagg.transport.inprocess import InProcessKVReceiver, InProcessKVSender


class FakeClock:
    """A test fake clock the leases and deadlines read."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_tokens=8, lease_s=10.0, budget=1 << 30, clock=None):
    model, _ = random_model("tiny-llama", seed=1)
    sender = InProcessKVSender(clock=clock or FakeClock())
    engine = PrefillEngine(model, model_name="tiny", sender=sender,
                           config=PrefillConfig(lease_s=lease_s, max_leased_bytes=budget))
    request = EngineRequest.create("r1", list(range(10, 60)),
                                   SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                   vocab_size=512, context=4096)
    return engine, sender, request


def test_header_roundtrips_through_msgpack():
    header = KVHeader("abc", KVFingerprint("m", "torch.bfloat16", "layout", "dense", 7), 42)
    data = header.encode()
    assert isinstance(data, bytes) and b"abc" in data
    assert KVHeader.decode(data) == header


def test_pull_is_bit_exact_and_frees_the_lease():
    engine, sender, request = make()
    published = engine.prefill_and_publish(request)
    kv = engine.prefill(request).kv
    assert published.handle is not None and sender.num_leases == 1
    receiver = InProcessKVReceiver(sender)
    receiver.start(published.handle, timeout_s=5)
    result = receiver.poll("r1")
    assert result.status is TransferStatus.DONE
    assert result.header.fingerprint == published.fingerprint
    assert result.header.first_token_id == published.first_token.token_id
    assert all(torch.equal(a, b) for a, b in zip(result.kv.k + result.kv.v, kv.k + kv.v))
    assert sender.num_leases == 0 and sender.leased_bytes == 0


def test_request_ending_at_its_first_token_takes_no_lease():
    engine, sender, request = make(max_tokens=1)
    published = engine.prefill_and_publish(request)
    assert published.handle is None and published.finish_reason == "length"
    assert sender.num_leases == 0


def test_expired_lease_is_freed_and_the_pull_fails():
    clock = FakeClock()
    engine, sender, request = make(lease_s=5.0, clock=clock)
    published = engine.prefill_and_publish(request)
    receiver = InProcessKVReceiver(sender, clock=clock)
    receiver.start(published.handle, timeout_s=60)
    clock.now = 6.0
    assert sender.expire() == ["r1"] and sender.num_leases == 0
    result = receiver.poll("r1")
    assert result.status is TransferStatus.FAILED and "lease" in result.error


def test_pull_deadline_and_abort_release_the_lease():
    clock = FakeClock()
    engine, sender, request = make(lease_s=100.0, clock=clock)
    receiver = InProcessKVReceiver(sender, clock=clock)
    receiver.start(engine.prefill_and_publish(request).handle, timeout_s=1.0)
    clock.now = 2.0
    assert receiver.poll("r1").status is TransferStatus.EXPIRED
    assert sender.num_leases == 0
    request2 = EngineRequest.create("r2", [5, 6, 7], request.params, vocab_size=512, context=4096)
    receiver.start(engine.prefill_and_publish(request2).handle, timeout_s=10.0)
    receiver.abort("r2")
    assert sender.num_leases == 0
    assert receiver.poll("r2").status is TransferStatus.ABORTED


def test_prefill_refuses_work_while_unpulled_kv_exceeds_its_budget():
    engine, sender, request = make(budget=1)
    engine.prefill_and_publish(request)
    request2 = EngineRequest.create("r2", [5, 6, 7], request.params, vocab_size=512, context=4096)
    with pytest.raises(PrefillBusyError, match="retry later"):
        engine.prefill_and_publish(request2)
    sender.release("r1")
    engine.prefill_and_publish(request2)
