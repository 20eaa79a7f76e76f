"""OpenAI response bodies: streamed chunks, final objects, usage and logprobs.

One ``ResponseBuilder`` per request turns ``OutputDelta``s into the JSON the endpoint sends,
for ``/v1/completions`` (``text_completion``) or ``/v1/chat/completions``
(``chat.completion[.chunk]``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from disagg.output import OutputDelta
from disagg.sampling import SampledToken


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass
class ResponseBuilder:
    """Builds one request's response objects (chat or completion, streamed or whole)."""

    chat: bool
    model: str
    num_prompt_tokens: int
    tokenizer: object | None = None
    want_logprobs: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    num_completion_tokens: int = 0
    timing: dict | None = None  # a disaggregated request's TTFT breakdown (usage extension)
    _text_offset: int = 0
    _sent_role: bool = False  # chat: the first chunk carries the role

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def usage(self) -> dict:
        """OpenAI's usage, plus ``disagg_timing`` (queue / prefill / transfer / first decode
        seconds, KV backend, bytes, GB/s) when the request was disaggregated."""
        usage = {"prompt_tokens": self.num_prompt_tokens,
                 "completion_tokens": self.num_completion_tokens,
                 "total_tokens": self.num_prompt_tokens + self.num_completion_tokens}
        if self.timing is not None:
            usage["disagg_timing"] = self.timing
        return usage

    def _token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _logprobs(self, tokens: tuple[SampledToken, ...] | list[SampledToken], text: str):
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_logprob(t) for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(self._token_str(t.token_id))
        return {
            "tokens": [self._token_str(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._token_str(i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": offsets,
        }

    def _chat_logprob(self, t: SampledToken) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            s = self._token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        return {**entry(t.token_id, t.logprob),
                "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}

    def chunk(self, delta: OutputDelta) -> dict | None:
        """The SSE chunk of one delta (None when it carries nothing to send)."""
        self.num_completion_tokens += len(delta.token_ids)
        # One chunk per generated token (its text may still be held back): clients count
        # tokens and time them; token-id models have no text at all.
        first_chat_chunk = self.chat and not self._sent_role
        if not (delta.text or delta.token_ids or delta.finished or first_chat_chunk):
            return None
        logprobs = self._logprobs(delta.logprobs, delta.text)
        if self.chat:
            message = {"content": delta.text}
            if not self._sent_role:
                message = {"role": "assistant", **message}
                self._sent_role = True
            choice = {"index": 0, "delta": message, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason}
            obj = "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created,
                "model": self.model, "choices": [choice]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage()}

    def whole(self, text: str, num_tokens: int, logprob_tokens: list[SampledToken],
              finish_reason: str | None) -> dict:
        """The non-streamed response."""
        self.num_completion_tokens = num_tokens
        tokens = logprob_tokens
        logprobs = self._logprobs(tokens, text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage()}
