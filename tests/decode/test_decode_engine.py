"""The decode engine on SmolLM2: same greedy ids as the single-request generator (and so as
transformers), batched or one at a time, local or from remote KV (DESIGN.md §7 margin rule)."""

from __future__ import annotations

import pytest
from decode_fakes import fake_prefill, reference_scores, request, run_to_end, token_ids, write_kv
from helpers import embedded_model_dir, greedy_prefix_length
from transformers import AutoTokenizer

from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.generate import SimpleGenerator
from disagg.models.loader import ModelSource, load_model
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver, DirectKVSender

MODEL_NAME = "smollm2-135m-instruct"
PROMPTS = [
    "Water boils at",
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    ("Photosynthesis is the process by which green plants and some other organisms use "
     "sunlight to synthesize foods from carbon dioxide and water."),
    "List three reasons why people enjoy reading books:",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    ("In computer science, a linked list is a linear collection of data elements whose order "
     "is not given by their physical placement in memory. Instead, each element points to the "
     "next."),
]


@pytest.fixture(scope="module")
def smollm2():
    path = embedded_model_dir()
    model = load_model(ModelSource(name=MODEL_NAME, path=path))
    return model, AutoTokenizer.from_pretrained(path)


def reference(model, prompt_ids, max_tokens: int) -> tuple[list[int], int]:
    """Greedy ids of the single-request generator and how many of them the margin rule checks."""
    ids = list(SimpleGenerator(model).generate(
        prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    return ids, greedy_prefix_length(reference_scores(model, prompt_ids, ids))


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_ids_equal_the_single_request_generator(smollm2, prompt):
    model, tokenizer = smollm2
    prompt_ids = tokenizer(prompt)["input_ids"]
    ref, checked = reference(model, prompt_ids, 40)
    assert checked >= 32, "choose a prompt without an early near-tie"
    engine = DecodeEngine(model, DecodeConfig(num_blocks=16), model_name=MODEL_NAME)
    engine.add_request(request(model, "r", prompt_ids, max_tokens=40, ignore_eos=True))
    outputs = run_to_end(engine)["r"]
    assert token_ids(outputs)[:checked] == ref[:checked]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert engine.num_free_blocks == engine.num_total_blocks


def test_eight_concurrent_requests_on_a_fragmented_pool_equal_one_at_a_time(smollm2):
    model, tokenizer = smollm2
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    max_tokens = [8 + i for i in range(8)]
    refs = [reference(model, p, n) for p, n in zip(prompts, max_tokens)]
    engine = DecodeEngine(model, DecodeConfig(block_size=4, num_blocks=120),
                          model_name=MODEL_NAME, receivers=(DirectKVReceiver(),))
    start_free = engine.num_free_blocks
    # Fragment the pool: 30 remote fillers reserve 4 blocks each (15 prompt tokens + token 0)
    # and fill it; aborting every other one (WAITING_FOR_REMOTE_KV) leaves 15 separate holes.
    for i in range(30):
        engine.add_remote_request(request(model, f"filler{i}", [100 + i] * 15, max_tokens=8))
    assert engine.num_free_blocks == 0
    for i in range(1, 30, 2):
        engine.abort(f"filler{i}")
        engine.writer_done(f"filler{i}")  # no prefill will write there: the rows are free
    assert len(engine.pool.free_ranges()) == 15
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(request(model, f"r{i}", p, max_tokens=n, ignore_eos=True))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(8)}
    step = 0
    while engine.has_unfinished():
        unfinished = {rid for rid in tokens if len(tokens[rid]) < max_tokens[int(rid[1:])]}
        forwards = engine.num_forwards
        outputs = engine.step()
        assert engine.num_forwards == forwards + 1, "one forward per step"
        # Every unfinished request got its token from that one forward.
        assert {o.request_id for o in outputs if o.request_id in tokens} == unfinished
        for o in outputs:
            if o.request_id in tokens:
                tokens[o.request_id].append(o.token.token_id)
        if step == 0:
            tables = [engine.block_table(f"r{i}") for i in range(8)]
            assert sum(len(t.ranges) > 1 for t in tables) >= 3, "block tables are fragmented"
            for i in range(0, 30, 2):
                engine.abort(f"filler{i}")
                engine.writer_done(f"filler{i}")
        step += 1
    assert step == max(max_tokens)
    for i, (ref, checked) in enumerate(refs):
        assert checked >= min(8, len(ref)), f"prompt {i} has an early near-tie"
        assert tokens[f"r{i}"][:checked] == ref[:checked], f"request {i}"
    assert engine.num_free_blocks == start_free


def test_remote_kv_gives_the_same_ids_as_local_prefill(smollm2):
    model, tokenizer = smollm2
    prompt_ids = tokenizer(PROMPTS[4])["input_ids"]
    sender = DirectKVSender()
    config = DecodeConfig(block_size=16, num_blocks=32)
    local = DecodeEngine(model, config, model_name=MODEL_NAME)
    remote = DecodeEngine(model, config, model_name=MODEL_NAME,
                          receivers=(DirectKVReceiver(),))
    for seed in (None, 1234):  # greedy, then seeded sampling
        params = {"max_tokens": 16, "ignore_eos": True, "logprobs": 2}
        if seed is not None:
            params.update(temperature=0.8, top_p=0.95, seed=seed)
        req = request(model, f"r{seed}", prompt_ids, **params)
        local.add_request(req)
        local_out = run_to_end(local)[req.request_id]
        remote.add_remote_request(req)
        first, kv, fingerprint = fake_prefill(model, req, model_name=MODEL_NAME)
        completion = write_kv(sender, remote.destinations(req.request_id), req, first, kv,
                              fingerprint)
        remote.kv_complete(req.request_id, first, completion)
        remote_out = run_to_end(remote)[req.request_id]
        assert [first.token_id] + token_ids(remote_out) == token_ids(local_out)
        assert remote_out[-1].finish_reason == "length"
        assert remote_out[0].token.logprob == pytest.approx(local_out[1].token.logprob, abs=1e-4)
        assert remote.num_free_blocks == remote.num_total_blocks
