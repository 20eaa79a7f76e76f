"""OpenAI-compatible request bodies, validated strictly (no coercion: ``"stream": "yes"`` is an
error, not ``true``). Fields OpenAI defines that we do not implement are rejected with a 400
naming them when they ask for behaviour we would otherwise silently ignore (``tools``,
``logit_bias``, ``best_of``, ``n > 1``, penalties...: ``UNSUPPORTED_FIELDS``); other unknown
fields are ignored, as OpenAI-compatible servers do. Every list a client controls is capped
(stop strings, stop token ids, messages, content parts), and so is JSON nesting
(``check_json_depth``), so no body costs more to validate than its size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Literal

try:  # parses a long prompt's id list 2-3x faster than ``json`` (see ``decode_json_body``)
    import orjson
except ImportError:  # pragma: no cover - a dependency; the standard parser does the same job
    orjson = None

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from disagg.errors import InvalidRequestError
from disagg.sampling import SamplingParams

_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256  # the output processor holds back this much text per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_JSON_DEPTH = 32  # the deepest valid body is 5 levels (messages[].content[].text)
_CONTAINERS = frozenset((dict, list))  # what a parsed JSON value nests with

# OpenAI fields we do not implement, each with the values that ask for nothing (the default):
# any other value would change the answer, so it is a 400 naming the field, never ignored.
_NOTHING = (None,)
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": _NOTHING,
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "best_of": (None, 1), "suffix": (None, ""), "echo": (None, False),
    "audio": _NOTHING, "modalities": (None, ["text"]), "prediction": _NOTHING,
    "web_search_options": _NOTHING, "reasoning_effort": _NOTHING,
    "min_tokens": (None, 0), "repetition_penalty": (None, 1.0), "guided_json": _NOTHING,
    "guided_regex": _NOTHING, "guided_choice": _NOTHING, "guided_grammar": _NOTHING,
}


def check_json_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``InvalidRequestError`` when a parsed JSON value nests deeper than ``limit``.
    A container of scalars only (a prompt's 131K ids) is passed over at C speed: the set
    of its element types is built without a Python-level step per element."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level:
            return
        children = [v.values() if type(v) is dict else v for v in level]
        level = [child for c in children if not _CONTAINERS.isdisjoint(set(map(type, c)))
                 for child in c if type(child) in _CONTAINERS]
    if level:
        raise InvalidRequestError(f"the JSON body nests deeper than {limit} levels")


def _same(a: object, b: object) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True is not 1 here


def _reject_unsupported(data: object) -> object:
    if isinstance(data, dict):
        named = sorted(k for k, ok in UNSUPPORTED_FIELDS.items()
                       if k in data and not any(_same(data[k], v) for v in ok))
        if named:
            raise InvalidRequestError(f"unsupported parameter(s): {', '.join(named)}; this "
                                      "server does not implement them", param=named[0])
    return data


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1  # vLLM extension; -1 or 0 = off
    seed: Annotated[StrictInt, Field(ge=-(1 << 63), lt=1 << 63)] | None = None  # int64, as vLLM
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = \
        None  # vLLM extension
    ignore_eos: StrictBool = False  # vLLM extension
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    user: str | None = None

    _unsupported = model_validator(mode="before")(_reject_unsupported)

    @model_validator(mode="after")
    def _check_stop(self):
        stops = self.stop_strings
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s for s in stops):
            raise InvalidRequestError("stop strings must not be empty", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequestError(f"stop strings are at most {MAX_STOP_STRING_CHARS} "
                                      "characters", param="stop")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), seed=self.seed, stop=self.stop_strings,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: the prompt as text or as token ids."""

    prompt: str | list[StrictInt]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: messages rendered through the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, str]]:
        """Messages for ``tokenizer.apply_chat_template`` (``developer`` acts as ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in self.messages]


def cap_max_tokens(params: SamplingParams, cap: int | None, *, num_prompt_tokens: int,
                   context: int) -> SamplingParams:
    """The server-side cap on generated tokens: a request asking for more is a 400; one that
    asks for none (whatever the context leaves) gets at most ``cap``."""
    if cap is None:
        return params
    if params.max_tokens is not None:
        if params.max_tokens > cap:
            raise InvalidRequestError(f"max_tokens ({params.max_tokens}) exceeds this server's "
                                      f"limit of {cap} generated tokens", param="max_tokens")
        return params
    remaining = context - num_prompt_tokens
    return params if remaining < 1 else dataclasses.replace(params,
                                                            max_tokens=min(cap, remaining))


def _no_constant(name: str):
    raise InvalidRequestError(f"malformed JSON body: {name} is not JSON")


def decode_json_body(raw: bytes) -> dict:
    """The body as a JSON object: strict JSON (no NaN/Infinity), UTF-8, at most
    ``MAX_JSON_DEPTH`` deep; anything else is an ``InvalidRequestError`` (a 400). orjson
    parses it when it can; the standard parser takes every body orjson refuses (lone
    surrogates, malformed JSON), so those are accepted and named as before. One difference:
    orjson reads an integer past 64 bits as a float, which the strict schema then refuses
    where an integer belongs (a 400; ``seed`` is bounded to int64, as in vLLM, so it is a
    400 either way)."""
    data = _loads_fast(raw)
    if data is None:
        data = _loads_exact(raw)
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    check_json_depth(data)
    return data


def _loads_fast(raw: bytes) -> object | None:
    """The parsed body, or None when orjson is missing or refuses it (a body of ``null``
    also gives None: the standard parser then reads it, and it is refused as no object)."""
    if orjson is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _loads_exact(raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the body is not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"malformed JSON body: {e}") from e
    except RecursionError as e:  # deeper than the parser's stack: far past MAX_JSON_DEPTH
        raise InvalidRequestError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} "
                                  "levels") from e
