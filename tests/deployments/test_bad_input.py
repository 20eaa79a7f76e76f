"""The bad-input battery: malformed, hostile and unsupported requests against the real app
(the module's shared Serve app, ``conftest.py``). Each gets the right 4xx and an OpenAI-shaped
error body, a field that would change the answer is refused by name (never ignored), and after
every one a good request is still served."""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
GOOD_IDS = [1, 2, 3]
CONTEXT = 8192  # SmolLM2's
MAX_TOKENS_LIMIT = 4096  # IngressSettings.max_tokens_limit's default
MSG = [{"role": "user", "content": "hi"}]


def comp(**fields) -> dict:
    return {"model": MODEL, "prompt": GOOD_IDS, "max_tokens": 1, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 1, **fields}


def deep(depth: int) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "prompt": [1], "x": ' + \
        b"[" * depth + b"]" * depth + b"}"


C, CH = "/v1/completions", "/v1/chat/completions"
JSON = {"content-type": "application/json"}

# (id, method, path, body: dict | bytes | None, headers, status, named): ``named`` must appear in
# the error's param or message (the field the client has to fix).
CASES = [
    # -- the body as bytes: JSON, encoding, nesting, size
    ("truncated-json", "POST", C, b'{"model":', JSON, 400, "JSON"),
    ("json-array", "POST", C, b"[1, 2]", JSON, 400, "object"),
    ("json-string", "POST", C, b'"hello"', JSON, 400, "object"),
    ("empty-body", "POST", C, b"", JSON, 400, "JSON"),
    ("invalid-utf8", "POST", C, b'{"model": "\xff\xfe", "prompt": [1]}', JSON, 400, "UTF-8"),
    ("nan", "POST", C, b'{"model": "m", "prompt": [1], "temperature": NaN}', JSON, 400, "NaN"),
    ("infinity", "POST", C, b'{"model": "m", "prompt": [1], "top_p": -Infinity}', JSON, 400,
     "Infinity"),
    ("nesting-100000", "POST", C, deep(100_000), JSON, 400, "deeper"),
    ("nesting-40", "POST", C, deep(40), JSON, 400, "deeper"),
    ("text-plain", "POST", C, json.dumps(comp()).encode(), {"content-type": "text/plain"}, 415,
     "application/json"),
    ("form", "POST", CH, b"model=x", {"content-type": "application/x-www-form-urlencoded"},
     415, "application/json"),
    ("no-content-type", "POST", C, json.dumps(comp()).encode(), {}, 415, "application/json"),
    ("json-lookalike", "POST", C, json.dumps(comp()).encode(),
     {"content-type": "application/jsonp"}, 415, "application/json"),
    # -- completions: model, prompt, limits
    ("missing-model", "POST", C, {"prompt": GOOD_IDS}, JSON, 400, "model"),
    ("unknown-model", "POST", C, comp(model="gpt-4"), JSON, 404, "model"),
    ("model-int", "POST", C, comp(model=7), JSON, 400, "model"),
    ("missing-prompt", "POST", C, {"model": MODEL}, JSON, 400, "prompt"),
    ("prompt-object", "POST", C, comp(prompt={"a": 1}), JSON, 400, "prompt"),
    ("prompt-empty-list", "POST", C, comp(prompt=[]), JSON, 400, "prompt"),
    ("prompt-float-ids", "POST", C, comp(prompt=[1.5, 2.0]), JSON, 400, "prompt"),
    ("token-out-of-vocab", "POST", C, comp(prompt=[1, 10**9]), JSON, 400, "prompt"),
    ("token-negative", "POST", C, comp(prompt=[1, -1]), JSON, 400, "prompt"),
    ("prompt-over-context", "POST", C, comp(prompt=[5] * (CONTEXT + 10)), JSON, 400, "prompt"),
    ("prompt-plus-max-tokens", "POST", C, comp(prompt=[5] * (CONTEXT - 100), max_tokens=200),
     JSON, 400, "max_tokens"),
    ("max-tokens-0", "POST", C, comp(max_tokens=0), JSON, 400, "max_tokens"),
    ("max-tokens-negative", "POST", C, comp(max_tokens=-5), JSON, 400, "max_tokens"),
    ("max-tokens-string", "POST", C, comp(max_tokens="5"), JSON, 400, "max_tokens"),
    ("max-tokens-over-cap", "POST", C, comp(max_tokens=MAX_TOKENS_LIMIT + 1), JSON, 400,
     "max_tokens"),
    ("max-tokens-absurd", "POST", C, comp(max_tokens=10**18), JSON, 400, "max_tokens"),
    ("temperature-negative", "POST", C, comp(temperature=-1), JSON, 400, "temperature"),
    ("temperature-absurd", "POST", C, comp(temperature=1e9), JSON, 400, "temperature"),
    ("top-p-zero", "POST", C, comp(top_p=0), JSON, 400, "top_p"),
    ("top-p-over-1", "POST", C, comp(top_p=1.5), JSON, 400, "top_p"),
    ("top-k-negative", "POST", C, comp(top_k=-2), JSON, 400, "top_k"),
    ("seed-float", "POST", C, comp(seed=1.5), JSON, 400, "seed"),
    ("stream-string", "POST", C, comp(stream="yes"), JSON, 400, "stream"),
    ("stream-options-unstreamed", "POST", C, comp(stream_options={"include_usage": True}),
     JSON, 400, "stream_options"),
    ("n-2", "POST", C, comp(n=2), JSON, 400, "n"),
    ("best-of", "POST", C, comp(best_of=2), JSON, 400, "best_of"),
    ("echo", "POST", C, comp(echo=True), JSON, 400, "echo"),
    ("suffix", "POST", C, comp(suffix=" the end"), JSON, 400, "suffix"),
    ("logit-bias", "POST", C, comp(logit_bias={"5": 100}), JSON, 400, "logit_bias"),
    ("logprobs-21", "POST", C, comp(logprobs=21), JSON, 400, "logprobs"),
    ("logprobs-negative", "POST", C, comp(logprobs=-1), JSON, 400, "logprobs"),
    ("presence-penalty", "POST", C, comp(presence_penalty=0.5), JSON, 400, "presence_penalty"),
    ("frequency-penalty", "POST", C, comp(frequency_penalty=-1), JSON, 400,
     "frequency_penalty"),
    ("stop-too-many", "POST", C, comp(stop=["a", "b", "c", "d", "e"]), JSON, 400, "stop"),
    ("stop-too-long", "POST", C, comp(stop=["x" * 10_000]), JSON, 400, "stop"),
    ("stop-empty", "POST", C, comp(stop=[""]), JSON, 400, "stop"),
    ("stop-not-strings", "POST", C, comp(stop=[1, 2]), JSON, 400, "stop"),
    ("stop-token-ids-too-many", "POST", C, comp(stop_token_ids=list(range(1000))), JSON, 400,
     "stop_token_ids"),
    # -- chat: messages, roles, content, logprobs, unsupported features
    ("messages-missing", "POST", CH, {"model": MODEL}, JSON, 400, "messages"),
    ("messages-empty", "POST", CH, chat(messages=[]), JSON, 400, "messages"),
    ("messages-not-list", "POST", CH, chat(messages="hi"), JSON, 400, "messages"),
    ("message-not-object", "POST", CH, chat(messages=["hi"]), JSON, 400, "messages"),
    ("message-no-role", "POST", CH, chat(messages=[{"content": "hi"}]), JSON, 400, "role"),
    ("role-tool", "POST", CH, chat(messages=[{"role": "tool", "content": "x"}]), JSON, 400,
     "role"),
    ("role-unknown", "POST", CH, chat(messages=[{"role": "wizard", "content": "x"}]), JSON, 400,
     "role"),
    ("content-int", "POST", CH, chat(messages=[{"role": "user", "content": 5}]), JSON, 400,
     "content"),
    ("content-image-part", "POST", CH, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), JSON, 400, "content"),
    ("too-many-messages", "POST", CH, chat(messages=MSG * 2000), JSON, 400, "messages"),
    ("tools", "POST", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]), JSON,
     400, "tools"),
    ("tool-choice", "POST", CH, chat(tool_choice="auto"), JSON, 400, "tool_choice"),
    ("response-format-json-schema", "POST", CH, chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {}}}),
     JSON, 400, "response_format"),
    ("response-format-json-object", "POST", CH, chat(response_format={"type": "json_object"}),
     JSON, 400, "response_format"),
    ("chat-logit-bias", "POST", CH, chat(logit_bias={"1": -100}), JSON, 400, "logit_bias"),
    ("chat-n-3", "POST", CH, chat(n=3), JSON, 400, "n"),
    ("top-logprobs-21", "POST", CH, chat(logprobs=True, top_logprobs=21), JSON, 400,
     "top_logprobs"),
    ("top-logprobs-without-logprobs", "POST", CH, chat(top_logprobs=2), JSON, 400,
     "top_logprobs"),
    ("chat-logprobs-int", "POST", CH, chat(logprobs=5), JSON, 400, "logprobs"),
    ("max-completion-tokens-0", "POST", CH, chat(max_completion_tokens=0), JSON, 400,
     "max_completion_tokens"),
    ("chat-max-tokens-over-cap", "POST", CH, chat(max_tokens=MAX_TOKENS_LIMIT + 1), JSON, 400,
     "max_tokens"),
    # -- methods and paths
    ("get-completions", "GET", C, None, {}, 405, "GET"),
    ("put-chat", "PUT", CH, json.dumps(chat()).encode(), JSON, 405, "PUT"),
    ("delete-models", "DELETE", "/v1/models", None, {}, 405, "DELETE"),
    ("unknown-path", "POST", "/v1/engines/x/completions", json.dumps(comp()).encode(), JSON,
     404, "/v1/engines/x/completions"),
    ("unknown-get", "GET", "/admin", None, {}, 404, "/admin"),
    # internal deployments have no public route: their methods are not reachable over HTTP
    ("decode-generate", "POST", "/DecodeServer/generate", json.dumps(comp()).encode(), JSON,
     404, "/DecodeServer/generate"),
    ("prefill-stats", "GET", "/PrefillServer/stats", None, {}, 404, "/PrefillServer/stats"),
]


def assert_openai_error(r: httpx.Response, status: int, named: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert named in f"{error['param']} {error['message']}", error


def assert_still_serving(http: httpx.Client) -> None:
    r = http.post(C, json=comp(max_tokens=2, temperature=0))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app, timeout=120) as client:
        yield client


def test_the_battery_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("method, path, body, headers, status, named",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_in_openai_shape(http, method, path, body, headers, status, named):
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    r = http.request(method, path, content=content, headers=headers)
    assert_openai_error(r, status, named)
    assert_still_serving(http)


def test_chunked_upload_over_the_limit_is_413_while_reading(http):
    """No Content-Length: the limit holds as the body arrives, not after reading it all."""
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": ['
        for _ in range(4096):  # 4096 x 1 KiB: ~4 MiB, over the ~1.06 MiB default limit
            sent += 1
            yield b"1, " * 341 + b"1,"
        yield b"1]}"

    r = http.post(C, content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "exceeds")
    assert_still_serving(http)


@pytest.mark.parametrize("field, value", [
    ("best_of", 1), ("echo", False), ("suffix", ""), ("logit_bias", {}), ("tools", []),
    ("tool_choice", "none"), ("response_format", {"type": "text"}), ("n", 1),
])
def test_unsupported_fields_at_their_no_op_value_are_accepted(http, field, value):
    r = http.post(C, json=comp(**{field: value}))
    assert r.status_code == 200, r.text[:300]


def test_json_with_charset_is_json(http):
    r = http.post(C, content=json.dumps(comp()).encode(),
                  headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text[:300]


def test_the_service_still_serves_at_the_end(http):
    assert_still_serving(http)
    r = http.post(CH, json=chat(max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
