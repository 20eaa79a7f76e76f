"""The load generator against a fake server that answers errors: every failure is counted by
status and the run never crashes; plus the workload grammar and the report's definitions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fake_openai_server import (
    BAD_REQUEST,
    CUT,
    OK,
    RATE_LIMITED,
    SERVER_ERROR,
    STREAM_ERROR,
    FakeErrorServer,
)

from benchmarks.loadgen.client import RequestResult, RequestSpec
from benchmarks.loadgen.report import parse_slos, summarize
from benchmarks.loadgen.runner import RunConfig, run
from benchmarks.loadgen.workload import arrival_times, parse_lengths, synthetic


def test_errors_are_counted_by_status_and_never_crash_the_run():
    kinds = [OK, RATE_LIMITED, SERVER_ERROR, BAD_REQUEST, STREAM_ERROR, CUT] * 3
    items = synthetic(len(kinds), parse_lengths("fixed:4"), parse_lengths("fixed:3"),
                      rate=200.0, seed=1)
    with FakeErrorServer() as url:
        def spec(w):
            return RequestSpec(url=f"{url}/v1/completions", chat=False, model="fake-model",
                               prompt=[kinds[w.index], 7, 8, 9], max_tokens=w.output_tokens)

        results = asyncio.run(run(items, spec, RunConfig(progress=False, timeout_s=30)))
    row = summarize(results, parse_slos(["ttft:60000"]))
    assert row["completed"] == 3 and row["failed"] == 15
    assert row["errors_by_status"] == {"200_stream_error": 6, "400": 3, "429": 3, "500": 3}
    for r, kind in zip(results, kinds):
        assert r.success == (kind == OK)
        if kind == OK:
            assert r.output_tokens == 3 == r.num_token_chunks and len(r.itl_s) == 2
            assert r.ttft_s <= r.e2e_s
        elif kind == RATE_LIMITED:
            assert r.status == 429 and r.error == "slow down"
    assert row["goodput_rps"] == pytest.approx(3 / row["duration_s"])


def test_length_specs_and_arrivals():
    rng = np.random.default_rng(0)
    assert parse_lengths("fixed:7").sample(rng, 3).tolist() == [7, 7, 7]
    u = parse_lengths("uniform:5:9").sample(rng, 1000)
    assert u.min() == 5 and u.max() == 9
    ln = parse_lengths("lognormal:1000:0.5:100:2000").sample(rng, 4000)
    assert 100 <= ln.min() and ln.max() <= 2000 and abs(np.median(ln) - 1000) < 60
    mix = parse_lengths("mix:0.9*fixed:10,0.1*fixed:128")
    assert abs((mix.sample(rng, 5000) == 128).mean() - 0.1) < 0.02
    assert mix.spec() == "mix:0.9*fixed:10,0.1*fixed:128"
    with pytest.raises(ValueError):
        parse_lengths("uniform:9:5")
    gaps = np.diff(arrival_times(20001, 4.0, 1.0, rng))
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.01  # exponential
    bursty = np.diff(arrival_times(20001, 4.0, 0.25, rng))
    assert abs(bursty.mean() - 0.25) < 0.02 and bursty.std() > 0.4  # CV = 1/sqrt(shape) = 2


def test_tpot_and_goodput_definitions():
    r = RequestResult(0, 10, 5, success=True, ttft_s=1.0, e2e_s=3.0, output_tokens=5,
                      itl_s=[0.5] * 4)
    single = RequestResult(1, 10, 1, start_s=0.5, success=True, ttft_s=2.5, e2e_s=2.5,
                           output_tokens=1)
    assert r.tpot_s == 0.5 and single.tpot_s is None
    row = summarize([r, single], parse_slos(["ttft:2000", "tpot:600"]))
    assert row["duration_s"] == 3.0
    assert row["goodput_rps"] == pytest.approx(1 / 3)  # the second misses the TTFT SLO
    assert row["tpot_mean_s"] == 0.5 and row["itl_p50_s"] == 0.5
    assert row["ttft_p50_s"] == pytest.approx(1.75)  # linear interpolation, as numpy


def test_text_prompts_have_the_asked_length():
    from helpers import embedded_model_dir

    from benchmarks.loadgen.prompts import TextPrompts

    prompts = TextPrompts(embedded_model_dir(), seed=2)
    for n in (1, 37, 300):
        text = prompts.build(n, n)
        assert isinstance(text, str) and prompts.count(text) == n
    assert prompts.build(5, 40) == prompts.build(5, 40)  # seeded per request


def test_which_chunks_count_as_tokens():
    from benchmarks.loadgen.client import _is_token_chunk

    role_only = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    role_and_text = {"delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}
    empty_text = {"text": "", "finish_reason": None}
    assert not _is_token_chunk(role_only, chat=True, token_chunks="text")
    assert _is_token_chunk(role_and_text, chat=True, token_chunks="text")
    assert not _is_token_chunk(empty_text, chat=False, token_chunks="text")  # vLLM's rule
    assert _is_token_chunk(empty_text, chat=False, token_chunks="any")  # one chunk per token
    assert not _is_token_chunk(role_only, chat=True, token_chunks="any")
    assert _is_token_chunk({"delta": {"content": ""}}, chat=True, token_chunks="any")
