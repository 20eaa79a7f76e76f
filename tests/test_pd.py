"""The disaggregated path in one process (real PrefillEngine -> in-process hand-off -> real
DecodeEngine) against the colocated generator and transformers, dense and TriangleMix."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from disagg_kernels.triangle_mix import TriangleParams
from helpers import REPO_ROOT, embedded_model_dir, greedy_prefix_length
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from disagg.attention.triangle import published_trianglemix
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.errors import KVMismatchError
from disagg.generate import SimpleGenerator
from disagg.inprocess import InProcessDisaggregated
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.direct import DirectKVReceiver, DirectKVSender

NAME = "smollm2-135m-instruct"
PROMPT = ("The history of the lighthouse begins in ancient times. Fires were lit on hills to "
          "guide ships home, and later towers were built so the light could be seen from far "
          "away. The most famous of these was the Pharos of Alexandria, one of the seven "
          "wonders of the ancient world. In the centuries that followed, lighthouses spread "
          "along the coasts of Europe, and their keepers became")
SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)


@pytest.fixture(scope="module")
def smollm2():
    path = embedded_model_dir()
    return load_model(ModelSource(name=NAME, path=path)), AutoTokenizer.from_pretrained(path)


def pipeline(model, trianglemix=None, model_name=NAME) -> InProcessDisaggregated:
    prefill = PrefillEngine(model, model_name=model_name, trianglemix=trianglemix,
                            senders=(DirectKVSender(),))
    decode = DecodeEngine(model, DecodeConfig(num_blocks=256), model_name=NAME,
                          receivers=(DirectKVReceiver(),))
    return InProcessDisaggregated(prefill, decode, model.config.eos_token_ids)


def assert_nothing_held(pd: InProcessDisaggregated, deadline_s: float = 10.0) -> None:
    """Every block back in the pool, none fenced, no request left (read between steps). A
    request that ended with an error has its end reported by the engine's next step, which
    may come after the caller saw the error: the state is read again until the engine is
    idle or the liveness deadline passes (a request held for good still fails)."""
    end = time.monotonic() + deadline_s
    while True:
        free, total, fenced, unfinished = pd.run_on_engine(lambda e: (
            e.num_free_blocks, e.num_total_blocks, e.num_fenced_blocks, e.has_unfinished()))
        if not unfinished or time.monotonic() > end:
            break
        time.sleep(0.01)
    assert (free, fenced, unfinished) == (total, 0, False)


def request(ids, max_tokens=32, **kw) -> EngineRequest:
    return EngineRequest.create("r", ids, SamplingParams(max_tokens=max_tokens, **kw),
                                vocab_size=49152, context=8192)


def test_disaggregated_greedy_equals_colocated_and_transformers(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT)["input_ids"]
    pd = pipeline(model)
    ours = [t.token_id for t in pd.generate(request(ids, temperature=0.0))]
    colocated = list(SimpleGenerator(model).generate(ids, SamplingParams(max_tokens=32,
                                                                         temperature=0.0)))
    reference = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    out = reference.generate(torch.tensor([ids]), generation_config=GenerationConfig(
        max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id,
        output_scores=True, return_dict_in_generate=True))
    checked = greedy_prefix_length(torch.stack(out.scores)[:, 0])
    assert checked >= 24
    assert ours[:checked] == out.sequences[0, len(ids):].tolist()[:checked]
    assert ours == colocated
    assert_nothing_held(pd)
    timing = pd.last_timing
    assert timing.backend == "inprocess"
    assert timing.kv_bytes == len(ids) * pd.decode.layout.bytes_per_token
    assert timing.transfer_s > 0 and timing.first_decode_s > 0 and timing.prefill_s > 0


def test_trianglemix_disaggregated_equals_colocated_with_trianglemix(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(ids) > SMALL.n_sink + SMALL.n_window + SMALL.n_last  # Triangle layers active
    trianglemix = published_trianglemix(NAME, SMALL)
    ours = [t.token_id for t in pipeline(model, trianglemix).generate(
        request(ids, temperature=0.0))]
    colocated = list(SimpleGenerator(model, trianglemix=trianglemix).generate(
        ids, SamplingParams(max_tokens=32, temperature=0.0)))
    assert ours == colocated
    # Seeded sampling: the keyed draws make both paths pick the same tokens.
    req = request(ids, temperature=0.9, top_p=0.95, seed=11)
    sampled = [t.token_id for t in pipeline(model, trianglemix).generate(req)]
    assert sampled == list(SimpleGenerator(model, trianglemix=trianglemix).generate(
        ids, req.params, seed=req.seed))


def test_mismatched_fingerprint_is_rejected_and_nothing_leaks(smollm2):
    model, tokenizer = smollm2
    pd = pipeline(model, model_name="some-other-model")
    with pytest.raises(KVMismatchError, match="model"):
        list(pd.generate(request(tokenizer(PROMPT)["input_ids"], temperature=0.0)))
    assert_nothing_held(pd)


def test_closing_the_stream_early_aborts_on_both_sides(smollm2):
    model, tokenizer = smollm2
    pd = pipeline(model)
    stream = pd.generate(request(tokenizer(PROMPT)["input_ids"], temperature=0.0))
    next(stream), next(stream)
    stream.close()
    assert_nothing_held(pd)


def test_cli_disaggregated_matches_colocated():
    def run(*flags):
        result = subprocess.run(
            [sys.executable, "-m", "disagg", "generate", "--prompt", PROMPT, "--max-tokens",
             "12", "--json", "--trianglemix", *flags],
            check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    colocated, disaggregated = run(), run("--disaggregated")
    assert disaggregated["token_ids"] == colocated["token_ids"]
    assert disaggregated["text"] == colocated["text"]
