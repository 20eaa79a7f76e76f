"""The Serve app end to end: OpenAI client and raw HTTP streaming on both paths, the first
token's stop rules, errors with the one status mapping, and no leaks on disconnect."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import LOCAL_PREFILL_MAX_TOKENS
from helpers import embedded_model_dir
from ray import serve
from transformers import AutoTokenizer

from deployments.ingress import HTTP_WARMUP_REQUESTS, WARMUP_HEADER
from disagg.generate import SimpleGenerator
from disagg.models.loader import ModelSource, load_model
from disagg.sampling import SamplingParams

MODEL = "smollm2-135m-instruct"
SHORT = "Hi"  # well under LOCAL_PREFILL_MAX_TOKENS with the chat template
LONG = "Write two sentences about the sea, the wind, and a small boat sailing home at dusk."


@pytest.fixture(scope="module")
def reference():
    """Greedy completions of the chat-templated prompt by the colocated generator."""
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = SimpleGenerator(load_model(ModelSource(name=MODEL, path=path)))

    def complete(content: str, max_tokens: int) -> tuple[int, str]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out = list(generator.generate(ids, SamplingParams(max_tokens=max_tokens,
                                                          temperature=0.0)))
        return len(ids), tokenizer.decode(out, skip_special_tokens=True)

    return complete


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def stats():
    decode = serve.get_deployment_handle("DecodeServer", "disagg").stats.remote().result()
    prefill = serve.get_deployment_handle("PrefillServer", "disagg").stats.remote().result()
    return decode, prefill


def wait_for_baseline(baseline_free: int, deadline_s: float = 60.0):
    """Liveness deadline, not a speed bound: the replicas' own counters return to baseline."""
    end = time.monotonic() + deadline_s
    while True:
        decode, prefill = stats()
        if decode.num_free_blocks == baseline_free and prefill.num_leases == 0 and \
                not decode.has_unfinished:
            return decode, prefill
        assert time.monotonic() < end, f"not back to baseline: {decode} {prefill}"
        time.sleep(0.2)


@pytest.mark.parametrize("content, path", [(SHORT, "local"), (LONG, "disaggregated")])
def test_openai_client_streams_the_engines_greedy_text(serve_app, reference, content, path):
    num_prompt, expected = reference(content, 16)
    assert (num_prompt < LOCAL_PREFILL_MAX_TOKENS) == (path == "local")
    with client(serve_app).chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=16,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-disagg-path"] == path
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.prompt_tokens == num_prompt
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("content, path", [(SHORT, "local"), (LONG, "disaggregated")])
def test_raw_http_sse_ends_with_done(serve_app, reference, content, path):
    _, expected = reference(content, 12)
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["x-disagg-path"] == path
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected


def test_first_token_from_prefill_honours_max_tokens_1_and_stop(serve_app, reference):
    baseline = stats()[0].num_free_blocks
    _, expected = reference(LONG, 3)
    c = client(serve_app)
    one = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}],
                                    max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1
    assert one.choices[0].finish_reason == "length"
    first_word = expected.split()[0]
    stopped = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}],
                                        max_tokens=8, temperature=0, stop=[first_word])
    assert stopped.choices[0].finish_reason == "stop"
    assert first_word not in stopped.choices[0].message.content
    wait_for_baseline(baseline)


def test_completions_with_token_ids_logprobs_and_seed(serve_app):
    c = client(serve_app)
    ids = list(range(1000, 1000 + LOCAL_PREFILL_MAX_TOKENS + 5))  # disaggregated
    a = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0.8, seed=7,
                             logprobs=2)
    b = c.completions.create(model=MODEL, prompt=ids[:10], max_tokens=6, temperature=0.8,
                             seed=7, logprobs=2)  # local
    a2 = c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0.8, seed=7)
    assert a.choices[0].text == a2.choices[0].text
    assert len(a.choices[0].logprobs.token_logprobs) == a.usage.completion_tokens
    assert all(len(t) <= 2 for t in a.choices[0].logprobs.top_logprobs)
    assert b.usage.prompt_tokens == 10


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    (json.dumps({"model": MODEL}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "stream": "yes"}), 400, "stream"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": 10**9}), 400, "max_tokens"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
])
def test_bad_chat_bodies_get_the_mapped_status(serve_app, body, status, param):
    r = httpx.post(f"{serve_app}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize("prompt, param", [
    ([5, 49152], "prompt"),  # outside the vocabulary
    ("word " * 9000, "prompt"),  # over the context
    ([], "prompt"),
])
def test_bad_prompts_get_400_and_the_service_keeps_serving(serve_app, prompt, param):
    r = httpx.post(f"{serve_app}/v1/completions",
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    ok = httpx.post(f"{serve_app}/v1/completions",
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(serve_app):
    # The default limit admits a max-context prompt as token ids (~1 MiB here), not more.
    r = httpx.post(f"{serve_app}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "a" * 1_300_000, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A max-context prompt as token ids passes the size check and meets the length rule
    # (8192 tokens leave no room to generate): 400 from the length rule, not 413.
    ids = [49151] * 8192
    r = httpx.post(f"{serve_app}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_models_and_health(serve_app):
    assert [m.id for m in client(serve_app).models.list()] == [MODEL]
    assert httpx.get(f"{serve_app}/health", timeout=10).status_code == 200


def test_the_ingress_warms_the_http_path_through_serves_proxy_at_start(serve_app):
    """Its start-up requests went through the proxy (found by Serve's internal naming) and
    were answered. That prefill counts none of them is checked on the GPU app
    (``test_handoff_gpu``: at ready, prefill has served only decode's warm-up)."""
    handle = serve.get_app_handle("disagg")
    assert handle.http_warmup.remote().result(timeout_s=60) == [200] * HTTP_WARMUP_REQUESTS


def test_a_forged_warmup_header_is_routed_as_any_request(serve_app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 2}
    r = httpx.post(f"{serve_app}/v1/chat/completions", json=body, timeout=60,
                   headers={WARMUP_HEADER: "not-the-token"})
    assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated"


@pytest.mark.parametrize("content", [SHORT, LONG])
def test_disconnect_mid_stream_frees_blocks_and_leases(serve_app, content):
    before = stats()[0]
    baseline = before.num_free_blocks
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{serve_app}/v1/chat/completions", json=body,
                      timeout=120) as response:
        for i, line in enumerate(response.iter_lines()):
            if i >= 3:
                break  # leave mid-stream: closing the connection aborts the request
    decode, _ = wait_for_baseline(baseline)
    assert decode.num_free_blocks == decode.num_total_blocks
    # Aborted, not run to its end: far fewer decode steps than the 200 tokens asked for.
    assert decode.num_forwards - before.num_forwards < 100


def test_requests_are_counted_in_ray_metrics(serve_app, metrics_port):
    httpx.post(f"{serve_app}/v1/completions", timeout=60,
               json={"model": MODEL, "prompt": "Hello", "max_tokens": 2}).raise_for_status()
    end = time.monotonic() + 60  # liveness: Ray exports metrics every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        counted = [line for line in text.splitlines()
                   if line.startswith("ray_disagg_requests_total{") and 'path="local"' in line
                   and 'status="200"' in line]
        if counted and "ray_disagg_time_to_first_token_seconds" in text:
            break
        assert time.monotonic() < end, "disagg metrics never reached Ray's exporter"
        time.sleep(1)
    assert float(counted[0].rsplit(" ", 1)[1]) >= 1
