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
