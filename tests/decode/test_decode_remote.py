"""Remote-KV requests on the decode engine (random:tiny-llama, in-process backend): blocks
before any destination, typed errors on mismatched or failed hand-offs, KV never decoded
without its completion record, and no block outlives its request or its writer."""

from __future__ import annotations

import dataclasses

import pytest
from decode_fakes import fake_prefill, request, run_to_end, token_ids, write_kv
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.errors import KVMismatchError, KVTransferError
from disagg.sampling import SampledToken
from disagg.transport.base import KVTransferAborted
from disagg.transport.direct import DirectKVReceiver, DirectKVSender

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
    return DirectKVSender(clock=clock)


def make_engine(model, clock, **config):
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 64)
    return DecodeEngine(model, DecodeConfig(**config), model_name=NAME,
                        receivers=(DirectKVReceiver(clock=clock),), clock=clock)


def hand_off(model, engine, sender, req, *, first=None, header_fp=None, num_layers=None):
    """Prefill ``req`` (fake) into its offered destination and report it complete."""
    token0, kv, fp = fake_prefill(model, req, model_name=NAME)
    first = first or token0
    completion = write_kv(sender, engine.destinations(req.request_id), req, first, kv,
                          header_fp or fp, num_layers=num_layers)
    engine.kv_complete(req.request_id, first, completion)
    return first


def test_remote_request_equals_local_request_and_is_bit_exact_in_place(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "r", PROMPT, max_tokens=12, ignore_eos=True)
    engine.add_request(req)
    local = token_ids(run_to_end(engine)["r"])
    engine.add_remote_request(req)
    assert engine.num_free_blocks == 64 - 8  # prompt + token 0 = 31 tokens: 8 blocks reserved
    [offer] = engine.destinations("r")
    assert offer.backend == "inprocess" and offer.num_prompt_tokens == len(PROMPT)
    assert sum(n for _, _, n in offer.runs) == len(PROMPT)
    _, kv, _ = fake_prefill(model, req, model_name=NAME)
    first = hand_off(model, engine, sender, req)
    written = engine.cache.read_packed(engine.block_table("r"), len(PROMPT))
    assert all((a == b).all() for a, b in zip(written.k + written.v, kv.k + kv.v))
    outputs = run_to_end(engine)["r"]
    assert [first.token_id] + token_ids(outputs) == local
    assert outputs[0].kv_receive_s is not None  # reported once, with the first decoded token
    assert all(o.kv_receive_s is None for o in outputs[1:])
    assert engine.num_free_blocks == 64 and engine.num_fenced_blocks == 0


def test_no_destination_before_the_blocks_are_reserved(model, sender, clock):
    engine = make_engine(model, clock, num_blocks=12)  # 48 tokens
    local = request(model, "local", PROMPT, max_tokens=10, ignore_eos=True)
    engine.add_request(local)
    engine.step()
    free_before = engine.num_free_blocks
    req1 = request(model, "r1", PROMPT[:20], max_tokens=4, ignore_eos=True)
    req2 = request(model, "r2", PROMPT[:4], max_tokens=4, ignore_eos=True)
    engine.add_remote_request(req1)  # needs 6 blocks: not now
    engine.add_remote_request(req2)  # would fit, but waits behind r1 (first come first served)
    assert engine.destinations("r1") == () and engine.destinations("r2") == ()
    assert engine.num_free_blocks == free_before
    outputs = {}
    while not engine.destinations("r1"):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    hand_off(model, engine, sender, req1)
    while not engine.destinations("r2"):
        engine.step()
    hand_off(model, engine, sender, req2)
    outputs.update(run_to_end(engine))
    assert len(token_ids(outputs["r1"])) == 3 and len(token_ids(outputs["r2"])) == 3
    assert engine.num_free_blocks == 12


@pytest.mark.parametrize("field,value", [
    ("model", "another-model"),
    ("dtype", "torch.bfloat16"),
    ("layout", "layer-contiguous-v1:L4:H2:D32"),
    ("num_prompt_tokens", 29),
])
def test_mismatched_fingerprint_raises_a_clear_error_and_leaks_nothing(
        model, sender, clock, field, value):
    engine = make_engine(model, clock)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    fp = fake_prefill(model, req, model_name=NAME)[2]
    with pytest.raises(KVMismatchError, match=field) as info:
        hand_off(model, engine, sender, req, header_fp=dataclasses.replace(fp, **{field: value}))
    assert "'r'" in str(info.value)
    assert engine.num_free_blocks == 64 and engine.num_fenced_blocks == 0
    [out] = engine.step()  # the end is reported to output readers too
    assert out.finished and out.finish_reason == "error" and out.error is info.value
    assert not engine.has_unfinished()


def test_completion_whose_token_0_disagrees_is_rejected(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    token0, kv, fp = fake_prefill(model, req, model_name=NAME)
    completion = write_kv(sender, engine.destinations("r"), req, token0, kv, fp)
    with pytest.raises(KVMismatchError, match="first token"):
        engine.kv_complete("r", SampledToken(token0.token_id + 1), completion)
    assert engine.num_free_blocks == 64


def test_another_attention_config_is_accepted_and_recorded(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "r", PROMPT, max_tokens=4, ignore_eos=True)
    engine.add_remote_request(req)
    fp = fake_prefill(model, req, model_name=NAME)[2]
    hand_off(model, engine, sender, req,
             header_fp=dataclasses.replace(fp, attention="trianglemix(sink=8,window=512)"))
    assert len(token_ids(run_to_end(engine)["r"])) == 3
    assert engine.num_free_blocks == 64


def test_partially_written_kv_has_no_completion_and_is_never_decoded(model, sender, clock):
    engine = make_engine(model, clock, remote_kv_timeout_s=60.0)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    with pytest.raises(KVTransferAborted, match="never written"):
        hand_off(model, engine, sender, req, num_layers=1)  # the writer stopped after layer 0
    for _ in range(5):
        assert engine.step() == [] and engine.num_forwards == 0  # nothing to decode from
    clock.now += 61.0
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVTransferError)
    assert engine.has_unfinished()  # its rows stay fenced a moment past the expiry
    clock.now += 6.0
    engine.step()
    assert engine.num_forwards == 0 and engine.num_free_blocks == 64
    assert not engine.has_unfinished()


def test_completion_after_the_destination_expired_is_not_decoded(model, sender, clock):
    engine = make_engine(model, clock, remote_kv_timeout_s=60.0)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    token0, kv, fp = fake_prefill(model, req, model_name=NAME)
    offers = engine.destinations("r")
    completion = write_kv(sender, offers, req, token0, kv, fp)  # written in time
    clock.now += 61.0  # ... but the record comes after the expiry
    engine.kv_complete("r", token0, completion)
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVTransferError)
    assert engine.num_forwards == 0 and engine.num_free_blocks == 64


def test_writer_refuses_an_expired_destination(model, sender, clock):
    engine = make_engine(model, clock, remote_kv_timeout_s=60.0)
    req = request(model, "r", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    clock.now += 61.0
    with pytest.raises(KVTransferAborted, match="expired"):
        hand_off(model, engine, sender, req)


def test_kv_that_never_comes_ends_the_request_at_its_deadline(model, clock):
    engine = make_engine(model, clock, remote_kv_timeout_s=60.0)
    engine.add_remote_request(request(model, "r", PROMPT, max_tokens=8))
    assert engine.step() == [] and engine.has_unfinished()
    clock.now += 61.0
    [out] = engine.step()
    assert out.finish_reason == "error" and isinstance(out.error, KVTransferError)
    engine.step()  # the fence of its unused destination lapses with the expiry
    clock.now += 10.0
    engine.step()
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()


@pytest.mark.parametrize("case", ["eos", "stop_token_id", "max_tokens_1"])
def test_first_token_that_ends_the_request_frees_the_blocks_at_once(model, sender, clock, case):
    engine = make_engine(model, clock)
    eos = model.config.eos_token_ids[0]
    params = {"eos": {"max_tokens": 8},
              "stop_token_id": {"max_tokens": 8, "stop_token_ids": (7,)},
              "max_tokens_1": {"max_tokens": 1}}[case]
    first = SampledToken({"eos": eos, "stop_token_id": 7, "max_tokens_1": 7}[case])
    req = request(model, "r", PROMPT, **params)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req, first=first)
    assert engine.num_free_blocks == 64
    [out] = engine.step()
    assert out.token is None and out.finished  # token 0 itself was delivered by the caller
    assert out.finish_reason == ("length" if case == "max_tokens_1" else "stop")
    assert engine.num_forwards == 0


def test_first_token_eos_with_ignore_eos_goes_on(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "r", PROMPT, max_tokens=3, ignore_eos=True)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req, first=SampledToken(model.config.eos_token_ids[0]))
    outputs = run_to_end(engine)["r"]
    assert len(token_ids(outputs)) == 2 and outputs[-1].finish_reason == "length"


def test_rows_a_writer_may_still_write_are_fenced_until_it_is_done(model, sender, clock):
    engine = make_engine(model, clock, num_blocks=16)
    req = request(model, "a", PROMPT, max_tokens=8)
    engine.add_remote_request(req)  # 8 blocks reserved, destination offered
    engine.abort("a")  # the client left while prefill may be writing
    assert engine.num_fenced_blocks == 8 and engine.num_free_blocks == 8
    other = request(model, "b", PROMPT, max_tokens=8)
    engine.add_remote_request(other)  # gets the other 8 blocks, never the fenced ones
    fenced_ids = set(range(16)) - set(engine.block_table("b").block_ids)
    assert len(fenced_ids) == 8
    engine.writer_done("a")  # the prefill call ended
    assert engine.num_fenced_blocks == 0 and engine.num_free_blocks == 8
    engine.abort("b", fence_grace_s=2.0)  # cancelled mid-prefill: fenced briefly
    assert engine.num_fenced_blocks == 8
    clock.now += 8.0  # grace + margin lapse
    engine.step()
    assert engine.num_fenced_blocks == 0 and engine.num_free_blocks == 16


def test_a_late_completion_of_an_aborted_request_frees_its_fence(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "a", PROMPT, max_tokens=8)
    engine.add_remote_request(req)
    offers = engine.destinations("a")
    engine.abort("a")
    token0, kv, fp = fake_prefill(model, req, model_name=NAME)
    engine.kv_complete("a", token0, write_kv(sender, offers, req, token0, kv, fp))
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()


def test_abort_while_decoding_frees_everything(model, sender, clock):
    engine = make_engine(model, clock)
    req = request(model, "c", PROMPT, max_tokens=8, ignore_eos=True)
    engine.add_remote_request(req)
    hand_off(model, engine, sender, req)
    engine.step()
    engine.step()
    engine.abort("c")
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()
    assert engine.step() == []  # no output follows an abort


def test_remote_request_needs_a_receiver(model):
    engine = DecodeEngine(model, DecodeConfig(num_blocks=8), model_name=NAME)
    with pytest.raises(ValueError, match="receiver"):
        engine.add_remote_request(request(model, "r", PROMPT, max_tokens=4))
