"""Overlapped decode steps (``DecodeConfig.async_scheduling``) on random:tiny-llama: the same
tokens, logprobs and ends as one step at a time; blocks of a request that ends while its next
forward is in flight are held until that forward lands; placeholder tokens need their source."""

from __future__ import annotations

import pytest
import torch
from decode_fakes import fake_prefill, request, run_to_end, token_ids, write_kv
from helpers import random_model

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.scheduler import PLACEHOLDER_TOKEN, ScheduledSequence, SchedulerOutput
from disagg.kv.block_pool import BlockPool
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver, DirectKVSender

NAME = "random:tiny-llama"


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=11)[0]


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 512, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def engine_of(model, overlapped: bool, **config) -> DecodeEngine:
    config.setdefault("num_blocks", 256)
    config.setdefault("block_size", 4)
    return DecodeEngine(model, DecodeConfig(async_scheduling=overlapped, **config),
                        model_name=NAME)


def outputs_of(engine: DecodeEngine, requests, late=(), late_after: int = 3):
    """Run ``requests``, adding ``late`` ones after ``late_after`` steps; each request's
    (token id, logprob, top logprobs) per token and its finish reason."""
    for r in requests:
        engine.add_request(r)
    seen: dict[str, list] = {}
    for _ in range(late_after):
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    for r in late:
        engine.add_request(r)
    for rid, outs in run_to_end(engine).items():
        seen.setdefault(rid, []).extend(outs)
    return {rid: ([(o.token.token_id, o.token.logprob, o.token.top_logprobs)
                   for o in outs if o.token is not None], outs[-1].finish_reason)
            for rid, outs in seen.items()}


def test_overlapped_steps_give_the_same_tokens_logprobs_and_ends(model):
    ids = prompts(6)
    def make():
        return [request(model, "greedy", ids[0], max_tokens=9, ignore_eos=True),
                request(model, "hot", ids[1], max_tokens=14, temperature=0.9, top_p=0.8,
                        seed=5, ignore_eos=True),
                request(model, "topk", ids[2], max_tokens=3, temperature=1.3, top_k=7,
                        seed=9, logprobs=3, ignore_eos=True),
                request(model, "one", ids[3], max_tokens=1, ignore_eos=True)], [
                request(model, "late", ids[4], max_tokens=6, temperature=0.7, seed=1,
                        ignore_eos=True),
                request(model, "late-long", ids[5], max_tokens=11, ignore_eos=True)]
    sync = engine_of(model, False)
    expected = outputs_of(sync, *make())
    overlapped = engine_of(model, True)
    got = outputs_of(overlapped, *make())
    assert got == expected
    assert {rid: len(t) for rid, (t, _) in got.items()} == {
        "greedy": 9, "hot": 14, "topk": 3, "one": 1, "late": 6, "late-long": 11}
    assert overlapped.num_overlapped_steps >= 8  # most decode steps overlapped
    assert sync.num_overlapped_steps == 0
    assert overlapped.num_free_blocks == overlapped.num_total_blocks
    assert overlapped.pool.num_held_blocks == 0


def test_a_stop_token_ends_the_request_and_its_queued_row_is_discarded(model):
    ids = prompts(1)[0]
    free = engine_of(model, False)
    free.add_request(request(model, "r", ids, max_tokens=12, ignore_eos=True))
    tokens = token_ids(run_to_end(free)["r"])
    stop = tokens[4]
    want = tokens[:tokens.index(stop) + 1]
    engine = engine_of(model, True)
    engine.add_request(request(model, "r", ids, max_tokens=12, ignore_eos=True,
                               stop_token_ids=(stop,)))
    outs = []
    while not (outs and outs[-1].finished):
        outs += engine.step()
    # The forward after the stop was queued before the stop was read: the request's blocks
    # wait for it to land.
    assert engine._pending is not None and engine.pool.num_held_blocks > 0
    assert engine.num_free_blocks < engine.num_total_blocks
    outs += run_to_end(engine).get("r", [])
    assert token_ids(outs) == want
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert sum(o.finished for o in outs) == 1
    assert engine.pool.num_held_blocks == 0
    assert engine.num_free_blocks == engine.num_total_blocks


def test_abort_lands_the_forward_in_flight_and_frees_at_once(model):
    ids = prompts(2)
    engine = engine_of(model, True)
    engine.add_request(request(model, "a", ids[0], max_tokens=30, ignore_eos=True))
    engine.add_request(request(model, "b", ids[1], max_tokens=30, ignore_eos=True))
    seen = {"a": 0, "b": 0}
    for _ in range(6):
        for o in engine.step():
            seen[o.request_id] += 1
    assert engine._pending is not None  # a forward is in flight
    held = engine.block_table("a").num_blocks
    free_before = engine.num_free_blocks
    engine.abort("a")
    assert engine._pending is None and engine.pool.num_held_blocks == 0
    assert engine.num_free_blocks == free_before + held
    outs = engine.step()  # first the landed forward's tokens
    assert [o.request_id for o in outs] == ["b"]  # nothing of "a" after its abort
    rest = run_to_end(engine)
    assert "a" not in rest and rest["b"][-1].finish_reason == "length"
    total_b = seen["b"] + sum(o.request_id == "b" and o.token is not None for o in outs) \
        + len(token_ids(rest["b"]))
    assert total_b == 30
    assert engine.num_free_blocks == engine.num_total_blocks


def test_held_frees_wait_for_their_fence():
    pool = BlockPool(10, 4)
    a, b = pool.allocate(3), pool.allocate(2)
    pool.hold_frees_until(1)
    pool.free(a)
    pool.hold_frees_until(2)
    pool.free(b)
    assert (pool.num_free_blocks, pool.num_held_blocks) == (5, 5)
    pool.release_held(1)
    assert (pool.num_free_blocks, pool.num_held_blocks) == (8, 2)
    pool.hold_frees_until(None)
    pool.release_held(2)
    assert (pool.num_free_blocks, pool.num_held_blocks) == (10, 0)
    pool.free(pool.allocate(10))  # frees at once again
    assert pool.num_free_blocks == 10


def test_placeholder_tokens_need_the_forward_they_come_from(model):
    engine = engine_of(model, True)
    table = engine.pool.allocate(2)
    seq = ScheduledSequence("r", (PLACEHOLDER_TOKEN,), 3, table, 0,
                            SamplingParams(temperature=0.0), 0)
    with pytest.raises(ValueError, match="placeholder"):
        engine.runner.launch(SchedulerOutput((seq,)))


def test_a_remote_request_is_reserved_and_decoded_while_steps_overlap(model):
    """Reservation and arrival polling go on between overlapped steps; the remote request
    and the local ones decode the same tokens as one step at a time."""
    def run(overlapped: bool):
        engine = DecodeEngine(model, DecodeConfig(block_size=4, num_blocks=128,
                                                  async_scheduling=overlapped),
                              model_name=NAME, receivers=(DirectKVReceiver(),))
        outs: dict[str, list] = {}

        def step():
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
        for i, p in enumerate(prompts(2)):
            engine.add_request(request(model, f"l{i}", p, max_tokens=24, ignore_eos=True))
        for _ in range(5):
            step()
        remote = request(model, "remote", list(range(10, 40)), max_tokens=8, ignore_eos=True)
        engine.add_remote_request(remote)
        for _ in range(3):
            if engine.destinations("remote"):
                break
            step()
        offers = engine.destinations("remote")
        assert offers, "no destination was reserved"
        token0, kv, fp = fake_prefill(model, remote, model_name=NAME)
        engine.kv_complete("remote", token0,
                           write_kv(DirectKVSender(), offers, remote, token0, kv, fp))
        for rid, more in run_to_end(engine).items():
            outs.setdefault(rid, []).extend(more)
        assert engine.num_free_blocks == engine.num_total_blocks
        return {rid: token_ids(o) for rid, o in outs.items()}, engine

    expected, _ = run(False)
    got, engine = run(True)
    assert got == expected
    assert len(got["remote"]) == 7 and len(got["l0"]) == 24  # token 0 came from prefill
    assert engine.num_overlapped_steps >= 15
