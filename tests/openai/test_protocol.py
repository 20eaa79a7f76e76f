"""Strict OpenAI request models and the one error mapping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from disagg.errors import ContextLengthError, KVMismatchError, UnknownModelError
from disagg.openai.errors import from_exception
from disagg.openai.protocol import ChatCompletionRequest, CompletionRequest


def chat(**fields):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_request_to_sampling_params():
    req = chat(max_completion_tokens=7, max_tokens=3, temperature=0, seed=5, stop="\n",
               logprobs=True, top_logprobs=2, stream=True, stream_options={"include_usage": True})
    params = req.sampling_params()
    assert (params.max_tokens, params.temperature, params.seed) == (7, 0.0, 5)
    assert params.stop == ("\n",) and params.logprobs == 2 and req.include_usage


def test_content_parts_and_developer_role():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]})
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "ab"}]


def test_completion_prompt_as_text_or_ids():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).max_tokens == 16


@pytest.mark.parametrize("fields, param", [
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.role"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 2}, None),
    ({"stop": ["a", ""]}, None),
])
def test_invalid_bodies_are_400_with_openai_error_shape(fields, param):
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    error = from_exception(info.value)
    assert error.status == 400
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    if param:
        assert error.param == param


def test_missing_messages_is_400():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m"})
    assert from_exception(info.value).param == "messages"


def test_engine_errors_map_to_one_status_each():
    assert from_exception(UnknownModelError("nope")).status == 404
    error = from_exception(ContextLengthError("too long", param="prompt"))
    assert (error.status, error.param) == (400, "prompt")
    assert from_exception(KVMismatchError("x")).status == 500
    assert from_exception(RuntimeError("secret")).body()["error"]["message"] == \
        "internal server error"


def test_server_cap_on_generated_tokens():
    from disagg.errors import InvalidRequestError
    from disagg.openai.protocol import cap_max_tokens
    from disagg.sampling import SamplingParams

    def cap(max_tokens, num_prompt_tokens=10):
        return cap_max_tokens(SamplingParams(max_tokens=max_tokens), 100,
                              num_prompt_tokens=num_prompt_tokens, context=1000).max_tokens

    assert (cap(None), cap(None, 950), cap(7), cap(100)) == (100, 50, 7, 100)
    assert cap(None, 1000) is None  # no room at all: the length rule reports it
    with pytest.raises(InvalidRequestError) as info:
        cap(101)
    assert info.value.param == "max_tokens"
    assert cap_max_tokens(SamplingParams(), None, num_prompt_tokens=1, context=9).max_tokens \
        is None


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function"}]), ("tool_choice", "required"), ("best_of", True),
    ("best_of", 3), ("echo", True), ("suffix", "x"), ("logit_bias", {"1": 1}),
    ("response_format", {"type": "json_schema"}), ("functions", [{}]), ("min_tokens", 5),
])
def test_unsupported_fields_are_named(field, value):
    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    error = from_exception(info.value)
    assert (error.status, error.param) == (400, field) and field in error.message


def test_json_depth_and_constants():
    from disagg.errors import InvalidRequestError
    from disagg.openai.protocol import MAX_JSON_DEPTH, decode_json_body

    ok = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert decode_json_body(ok)["a"]
    for raw in (b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}",
                b"[" * 100_000, b'{"a": NaN}', b'{"a": "\xc3\x28"}', b"[]"):
        with pytest.raises(InvalidRequestError):
            decode_json_body(raw)


BODIES = (b'{"model": "m", "prompt": [1, 2, 3], "temperature": 0.7, "stop": ["\\u00e9"]}',
          b'{"a": {"b": [true, false, null, -1.5e3, "\\ud83d\\ude00", {}]}, "a": 2}',
          b'{"prompt": "\\ud800"}',  # a lone surrogate: orjson refuses it, json takes it
          b'{"seed": 123456789012345678901234567890}')


@pytest.mark.parametrize("with_orjson", [True, False])
def test_json_bodies_parse_as_the_standard_parser_reads_them(with_orjson, monkeypatch):
    """orjson's fast path gives the standard parser's value, except an integer past 64 bits
    (a float there); without orjson the standard parser does it all."""
    import json

    from disagg.openai import protocol

    if not with_orjson:
        monkeypatch.setattr(protocol, "orjson", None)
    else:
        assert protocol.orjson is not None, "orjson is a dependency: the fast path must run"
    for raw in BODIES[:3]:
        assert protocol.decode_json_body(raw) == json.loads(raw)
    seed = protocol.decode_json_body(BODIES[3])["seed"]
    assert seed == (1.2345678901234568e29 if with_orjson else 123456789012345678901234567890)
    assert type(seed) is (float if with_orjson else int)
    long = b'{"prompt": [' + b", ".join(b"%d" % i for i in range(40_000)) + b"]}"
    assert protocol.decode_json_body(long)["prompt"] == list(range(40_000))


def test_a_seed_past_int64_is_a_400_whatever_parses_it():
    for seed in (1 << 63, 1e30, -(1 << 63) - 1):
        with pytest.raises(ValidationError) as info:
            CompletionRequest(model="m", prompt=[1], seed=seed)
        assert from_exception(info.value).param == "seed"
    assert CompletionRequest(model="m", prompt=[1], seed=(1 << 63) - 1).seed == (1 << 63) - 1
