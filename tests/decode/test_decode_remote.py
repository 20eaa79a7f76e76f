"""Remote-KV requests on the decode engine (random:tiny-llama, in-process transport): typed
errors on mismatched or failed hand-offs, and no block or lease outlives its request."""

from __future__ import annotations

import dataclasses

import pytest
from decode_fakes import fake_prefill, publish, request, run_to_end, token_ids
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.errors import KVMismatchError, KVTransferError
from disagg.sampling import SampledToken
from disagg.transport.inprocess import InProcessKVReceiver, InProcessKVSender

NAME = "random:tiny-llama"
PROMPT = list(range(10, 40))  # 30 tokens


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=5)[0]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sender(clock):
    return InProcessKVSender(clock=clock)


def make_engine(model, sender, clock, **config):
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 64)
    return DecodeEngine(model, DecodeConfig(**config), model_name=NAME,
                        receiver=InProcessKVReceiver(sender, clock=clock), clock=clock)


def hand_off(model, engine, sender, req, *, first=None, fingerprint=None, header_fp=None):
    """Prefill ``req`` (fake), publish its KV, and call ``kv_ready``."""
    token0, kv, fp = fake_prefill(model, req, model_name=NAME)
    first = first or token0
    handle = publish(sender, req, first, kv, header_fp or fp)
    engine.kv_ready(req.request_id, handle, first, fingerprint or fp)
    return first


def test_remote_request_equals_local_request(model, sender, clock):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=12, ignore_eos=True)
    engine.add_request(req)
    local = token_ids(run_to_end(engine)["r"])
    engine.add_remote_request(req)
    assert engine.num_free_blocks == 64 - 8  # prompt + token 0 = 31 tokens: 8 blocks reserved
    first = hand_off(model, engine, sender, req)
    assert [first.token_id] + token_ids(run_to_end(engine)["r"]) == local
    assert sender.num_leases == 0 and engine.num_free_blocks == 64


@pytest.mark.parametrize("field,value", [
    ("model", "another-model"),
    ("dtype", "torch.bfloat16"),
    ("layout", "layer-contiguous-v1:L4:H2:D32"),
    ("num_prompt_tokens", 29),
])
def test_mismatched_fingerprint_raises_a_clear_error_and_leaks_nothing(
        model, sender, clock, field, value):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    _, kv, fp = fake_prefill(model, req, model_name=NAME)
    bad = dataclasses.replace(fp, **{field: value})
    first = SampledToken(7)
    handle = publish(sender, req, first, kv, bad)
    with pytest.raises(KVMismatchError, match=field) as info:
        engine.kv_ready("r", handle, first, bad)
    assert "'r'" in str(info.value)
    assert engine.num_free_blocks == 64 and sender.num_leases == 0
    [out] = engine.step()  # the end is reported to output readers too
    assert out.finished and out.finish_reason == "error" and out.error is info.value
    assert not engine.has_unfinished()


def test_another_attention_config_is_accepted_and_recorded(model, sender, clock):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=4, ignore_eos=True)
    engine.add_remote_request(req)
    _, kv, fp = fake_prefill(model, req, model_name=NAME)
    fp = dataclasses.replace(fp, attention="trianglemix(sink=8,window=512,last=128)")
    first = SampledToken(7)
    engine.kv_ready("r", publish(sender, req, first, kv, fp), first, fp)
    assert len(token_ids(run_to_end(engine)["r"])) == 3
    assert engine.num_free_blocks == 64


def test_header_that_disagrees_with_kv_ready_fails_the_request(model, sender, clock):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    fp = fake_prefill(model, req, model_name=NAME)[2]
    hand_off(model, engine, sender, req, header_fp=dataclasses.replace(fp, model="other"))
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVMismatchError)
    assert engine.num_free_blocks == 64 and sender.num_leases == 0


def test_released_lease_ends_the_request_with_a_transfer_error(model, sender, clock):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req)
    sender.release("r")  # the prefill side dropped it (lease expired there, worker died...)
    [out] = engine.step()
    assert out.finished and out.finish_reason == "error" and out.token is None
    assert isinstance(out.error, KVTransferError) and "'r'" in str(out.error)
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()


def test_expired_pull_ends_the_request_with_a_transfer_error(model, sender, clock):
    engine = make_engine(model, sender, clock, kv_pull_timeout_s=5.0)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req)
    clock.now += 6.0
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVTransferError)
    assert "expired" in str(out.error)
    assert engine.num_free_blocks == 64 and sender.num_leases == 0


def test_kv_that_never_comes_ends_the_request_at_its_deadline(model, sender, clock):
    engine = make_engine(model, sender, clock, remote_kv_timeout_s=60.0)
    engine.add_remote_request(request(model, "r", PROMPT, max_tokens=8))
    assert engine.step() == [] and engine.has_unfinished()
    clock.now += 61.0
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVTransferError)
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()


@pytest.mark.parametrize("case", ["eos", "stop_token_id", "max_tokens_1"])
def test_first_token_that_ends_the_request_releases_the_lease_at_once(
        model, sender, clock, case):
    engine = make_engine(model, sender, clock)
    eos = model.config.eos_token_ids[0]
    params = {"eos": {"max_tokens": 8},
              "stop_token_id": {"max_tokens": 8, "stop_token_ids": (7,)},
              "max_tokens_1": {"max_tokens": 1}}[case]
    first = SampledToken({"eos": eos, "stop_token_id": 7, "max_tokens_1": 7}[case])
    req = request(model, "r", PROMPT, **params)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req, first=first)
    assert sender.num_leases == 0 and engine.num_free_blocks == 64
    [out] = engine.step()
    assert out.token is None and out.finished  # token 0 itself was delivered by the caller
    assert out.finish_reason == ("length" if case == "max_tokens_1" else "stop")
    assert engine.num_forwards == 0


def test_first_token_eos_with_ignore_eos_goes_on(model, sender, clock):
    engine = make_engine(model, sender, clock)
    req = request(model, "r", PROMPT, max_tokens=3, ignore_eos=True)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req, first=SampledToken(model.config.eos_token_ids[0]))
    outputs = run_to_end(engine)["r"]
    assert len(token_ids(outputs)) == 2 and outputs[-1].finish_reason == "length"


def test_abort_in_every_remote_state_frees_blocks_and_leases(model, sender, clock):
    engine = make_engine(model, sender, clock)
    # Before kv_ready: blocks reserved, no lease yet; a late kv_ready only releases the lease.
    req = request(model, "a", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    engine.abort("a")
    assert engine.num_free_blocks == 64
    hand_off(model, engine, sender, req)
    assert sender.num_leases == 0
    # After kv_ready, pull started but not yet polled.
    req = request(model, "b", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req)
    assert sender.num_leases == 1
    engine.abort("b")
    assert sender.num_leases == 0 and engine.num_free_blocks == 64
    # Decoding.
    req = request(model, "c", PROMPT, max_tokens=8, ignore_eos=True)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req)
    engine.step()
    engine.step()
    engine.abort("c")
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()
    assert engine.step() == []  # no output follows an abort


def test_reservation_waits_first_come_first_served_while_the_pool_is_busy(
        model, sender, clock):
    engine = make_engine(model, sender, clock, num_blocks=12)  # 48 tokens
    local = request(model, "local", PROMPT, max_tokens=10, ignore_eos=True)
    engine.add_request(local)
    engine.step()
    free_before = engine.num_free_blocks
    req1 = request(model, "r1", PROMPT[:20], max_tokens=4, ignore_eos=True)
    req2 = request(model, "r2", PROMPT[:4], max_tokens=4, ignore_eos=True)
    engine.add_remote_request(req1)  # needs 6 blocks: not now
    engine.add_remote_request(req2)  # would fit, but waits behind r1
    assert engine.num_free_blocks == free_before
    hand_off(model, engine, sender, req1)
    hand_off(model, engine, sender, req2)
    outputs = run_to_end(engine)
    assert len(token_ids(outputs["r1"])) == 3 and len(token_ids(outputs["r2"])) == 3
    assert sender.num_leases == 0 and engine.num_free_blocks == 12


def test_remote_request_needs_a_receiver(model):
    engine = DecodeEngine(model, DecodeConfig(num_blocks=8), model_name=NAME)
    with pytest.raises(ValueError, match="receiver"):
        engine.add_remote_request(request(model, "r", PROMPT, max_tokens=4))
