"""One streamed OpenAI request, timed on the client (``/v1/completions`` or
``/v1/chat/completions``, SSE ending in ``data: [DONE]``).

Definitions (vLLM's benchmark client, ``vllm bench serve``; differences marked *):
- TTFT: from just before the request is sent to the first chunk that carries generated
  output. vLLM counts a chunk only when its text is non-empty; so do we for text prompts
  (``token_chunks="text"``). *Random-weight models stream one chunk per token with empty text,
  so with ``token_chunks="any"`` (the default for token-id prompts) every chunk with a choice
  counts, except a chat chunk with only the role and no content.
- ITL: the gaps between consecutive counted chunks (one list per request).
- E2E latency: from the send to the last SSE line (vLLM: the last chunk received).
- Output tokens: ``usage.completion_tokens`` when the server sends usage (we ask for it with
  ``stream_options.include_usage``, as vLLM does), else the number of counted chunks.
- TPOT = (e2e - ttft) / (output_tokens - 1), for requests with more than one output token.
A request fails on a non-200 status (kept with its status code), an error object in the
stream (status 200, ``stream_error``), a connection error or timeout (status 0); it never
raises. Our server's extras are read when present: the ``x-disagg-path`` header and
``usage.disagg_timing`` (queue / prefill / transfer / first decode seconds).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp

PATH_HEADER = "x-disagg-path"


@dataclass
class RequestResult:
    index: int
    prompt_tokens: int  # as sent (client-side count)
    max_tokens: int
    start_s: float = 0.0  # when it was sent, seconds after the run started
    scheduled_s: float | None = None  # when the arrival process wanted it sent
    status: int = 0  # HTTP status; 0 = no response (connection error, timeout)
    success: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    num_token_chunks: int = 0
    server_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    path: str | None = None  # our x-disagg-path header (local | disaggregated)
    timing: dict | None = None  # our usage.disagg_timing

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


@dataclass(frozen=True)
class RequestSpec:
    """Everything the request function needs besides the session."""

    url: str  # full endpoint URL
    chat: bool
    model: str
    prompt: str | list[int]
    max_tokens: int
    ignore_eos: bool = False
    token_chunks: str = "text"  # "text" (vLLM) or "any" (see the module docstring)
    api_key: str | None = None
    extra_body: dict | None = None

    def body(self) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.0}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension most OpenAI-compatible servers take
        return {**body, **(self.extra_body or {})}


def _is_token_chunk(choice: dict, chat: bool, token_chunks: str) -> bool:
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    if text:
        return True
    if token_chunks != "any":
        return False
    if chat:  # an opening chunk with the role and no content carries no token
        return "role" not in (choice.get("delta") or {})
    return True


async def send(session: aiohttp.ClientSession, spec: RequestSpec, result: RequestResult,
               t0: float, timeout_s: float) -> RequestResult:
    """Send one request and fill ``result`` (times relative to ``t0`` = the run's start)."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    start = time.perf_counter()
    result.start_s = start - t0
    last = end = start  # last counted chunk (for ITL), last SSE line (for e2e)
    try:
        async with session.post(spec.url, json=spec.body(), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            result.status = resp.status
            result.path = resp.headers.get(PATH_HEADER)
            if resp.status != 200:
                result.error = _error_message(await resp.text())
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                now = end = time.perf_counter()
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = "stream_error: " + _error_message(json.dumps(chunk))
                    return result
                if chunk.get("usage"):
                    _read_usage(result, chunk["usage"])
                choices = chunk.get("choices") or []
                if choices and _is_token_chunk(choices[0], spec.chat, spec.token_chunks):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    result.num_token_chunks += 1
                    last = now
        result.e2e_s = end - start
        result.output_tokens = (result.usage_completion_tokens
                                if result.usage_completion_tokens is not None
                                else result.num_token_chunks)
        result.success = result.ttft_s is not None
        if not result.success:
            result.error = "the stream ended without a token"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        if result.status == 200:  # the stream broke after the status line
            result.error = "stream_error: " + result.error
    return result


def _read_usage(result: RequestResult, usage: dict) -> None:
    result.server_prompt_tokens = usage.get("prompt_tokens")
    result.usage_completion_tokens = usage.get("completion_tokens")
    if isinstance(usage.get("disagg_timing"), dict):
        result.timing = usage["disagg_timing"]


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    return text[:200]
