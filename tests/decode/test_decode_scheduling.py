"""Decode engine machinery on random:tiny-llama: capacity errors, preemption by recompute,
chunked prefill, seeded sampling across batch compositions, stop conditions, aborts."""

from __future__ import annotations

import pytest
import torch
from decode_fakes import reference_scores, request, run_to_end, token_ids
from helpers import greedy_prefix_length, random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.errors import InvalidRequestError, PoolCapacityError
from disagg.kv.layout import KVLayout
from disagg.transport.direct import DirectKVReceiver

NAME = "random:tiny-llama"


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=11)[0]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (7 + 9 * i,), generator=g).tolist() for i in range(n)]


def engine_of(model, **config) -> DecodeEngine:
    return DecodeEngine(model, DecodeConfig(**config), model_name=NAME,
                        receivers=(DirectKVReceiver(),))


def run_alone(model, req) -> list[int]:
    engine = engine_of(model, num_blocks=256)
    engine.add_request(req)
    return token_ids(run_to_end(engine)[req.request_id])


def mixed_requests(model, n: int):
    """Greedy and seeded-sampling requests of different lengths."""
    reqs = []
    for i, p in enumerate(prompts(n)):
        sampling = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 100 + i}
        if i % 2 == 0:
            sampling = {}
        reqs.append(request(model, f"r{i}", p, max_tokens=10 + 3 * i, ignore_eos=True,
                            **sampling))
    return reqs


def assert_same_as_alone(model, reqs, outputs) -> None:
    for req in reqs:
        alone = run_alone(model, req)
        got = token_ids(outputs[req.request_id])
        if req.params.temperature == 0:
            checked = greedy_prefix_length(reference_scores(model, req.prompt_token_ids, alone))
            assert got[:checked] == alone[:checked], req.request_id
        else:  # keyed sampling: the draw for token k depends only on (seed, k)
            assert got == alone, req.request_id


def test_request_that_can_never_fit_the_pool_is_rejected_up_front(model):
    engine = engine_of(model, block_size=4, num_blocks=8)  # 32 tokens
    for add in (engine.add_request, engine.add_remote_request):
        with pytest.raises(PoolCapacityError, match="32") as info:
            add(request(model, "big", list(range(3, 23)), max_tokens=13))  # 20 + 13 > 32
        assert isinstance(info.value, InvalidRequestError) and info.value.param == "max_tokens"
        assert engine.num_free_blocks == 8 and not engine.has_unfinished()
    engine.add_request(request(model, "fits", list(range(3, 23)), max_tokens=12))
    assert len(token_ids(run_to_end(engine)["fits"])) <= 12


def test_preemption_by_recompute_gives_the_same_tokens(model):
    reqs = mixed_requests(model, 6)
    engine = engine_of(model, block_size=4, num_blocks=40)  # 160 tokens for ~250 wanted
    for req in reqs:
        engine.add_request(req)
    outputs = run_to_end(engine)
    assert engine.num_preemptions > 0
    assert engine.num_free_blocks == 40
    assert_same_as_alone(model, reqs, outputs)


def test_batch_composition_does_not_change_tokens(model):
    reqs = mixed_requests(model, 6)
    # Small token budget and seat count: chunked prompts, staggered admission.
    engine = engine_of(model, block_size=8, num_blocks=128, max_num_seqs=3,
                       max_num_batched_tokens=16)
    for req in reqs:
        engine.add_request(req)
    outputs = run_to_end(engine)
    assert_same_as_alone(model, reqs, outputs)


def test_one_forward_per_step_with_local_prefills_admitted_alongside(model):
    engine = engine_of(model, num_blocks=64)
    engine.add_request(request(model, "a", prompts(1)[0], max_tokens=6, ignore_eos=True))
    engine.step()
    engine.add_request(request(model, "b", prompts(2)[1], max_tokens=6, ignore_eos=True))
    outputs = engine.step()  # b's prefill and a's decode row: one forward
    assert engine.num_forwards == 2 and {o.request_id for o in outputs} == {"a", "b"}


def test_stop_token_ids_eos_and_max_tokens(model):
    prompt = prompts(1)[0]
    greedy = run_alone(model, request(model, "g", prompt, max_tokens=8, ignore_eos=True))
    engine = engine_of(model, num_blocks=64)
    engine.add_request(request(model, "stop", prompt, max_tokens=8, stop_token_ids=(greedy[2],)))
    out = run_to_end(engine)["stop"]
    stop_at = greedy.index(greedy[2]) + 1
    assert token_ids(out) == greedy[:stop_at] and out[-1].finish_reason == "stop"
    eos_engine = DecodeEngine(model, DecodeConfig(num_blocks=64, eos_token_ids=(greedy[3],)),
                              model_name=NAME)
    eos_engine.add_request(request(model, "eos", prompt, max_tokens=8))
    eos_engine.add_request(request(model, "ignore", prompt, max_tokens=8, ignore_eos=True))
    outs = run_to_end(eos_engine)
    assert token_ids(outs["eos"]) == greedy[:greedy.index(greedy[3]) + 1]
    assert outs["eos"][-1].finish_reason == "stop"
    assert len(token_ids(outs["ignore"])) == 8 and outs["ignore"][-1].finish_reason == "length"
    assert all(not o.finished for o in outs["ignore"][:-1])


def test_logprobs_come_with_the_tokens(model):
    engine = engine_of(model, num_blocks=64)
    engine.add_request(request(model, "r", prompts(1)[0], max_tokens=4, logprobs=3))
    for out in run_to_end(engine)["r"]:
        token = out.token
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0] == (token.token_id, pytest.approx(token.logprob))


def test_abort_frees_blocks_in_every_local_state(model):
    engine = engine_of(model, block_size=4, num_blocks=64, max_num_seqs=2,
                       max_num_batched_tokens=8)
    ps = prompts(4)
    for i, p in enumerate(ps):
        engine.add_request(request(model, f"r{i}", p, max_tokens=30, ignore_eos=True))
    engine.step()  # r0 admitted with a first prompt chunk; the rest wait
    engine.abort("r3")  # waiting
    engine.abort("r0")  # mid-prompt (chunked prefill)
    for _ in range(6):
        engine.step()
    engine.abort("r1")  # decoding
    engine.abort("r2")
    engine.abort("unknown")  # ignored
    assert engine.num_free_blocks == 64 and not engine.has_unfinished()


def test_config_is_validated_and_sized_from_a_byte_budget(model):
    with pytest.raises(ValueError):
        DecodeConfig(num_blocks=4, kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError):
        DecodeConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError):
        DecodeConfig(block_size=0)
    layout = KVLayout.of_model(model)
    budget = 100 * 16 * layout.bytes_per_token + 123
    engine = DecodeEngine(model, DecodeConfig(kv_cache_bytes=budget), model_name=NAME)
    assert engine.num_total_blocks == 100
    with pytest.raises(ValueError, match="already"):
        engine.add_request(request(model, "r", [5, 6], max_tokens=2))
        engine.add_request(request(model, "r", [5, 6], max_tokens=2))
