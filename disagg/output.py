"""Per-request output processing: generated tokens -> text deltas, stop strings, logprobs.

Used by every consumer of the engines (CLI, HTTP ingress), for both paths: on the
disaggregated one, token 0 (sampled by prefill) goes through the same processor as the decode
engine's tokens. Life of a request's output here:
1. ``push(token)`` per generated token: the detokenizer releases text only once it is complete
   UTF-8 (``detokenize.py``); that text joins the *pending* text.
2. Stop strings: pending text that holds a stop string ends the request there (reason "stop";
   the stop string and everything after it are dropped; the consumer then aborts the engine
   request). Pending text whose tail could still grow into a stop string is held back; the
   rest is emitted.
3. ``push(None, finish_reason=...)`` or ``push(token, finish_reason=...)`` when the engine ends
   the request: held-back text is flushed (an incomplete UTF-8 tail is dropped, never emitted).
A finished processor ignores further tokens (it returns empty deltas).
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.detokenize import IncrementalDetokenizer
from disagg.errors import InvalidRequestError
from disagg.sampling import SampledToken, SamplingParams


@dataclass(frozen=True)
class OutputDelta:
    """What a consumer sends the client after one ``push``."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledToken, ...]  # one per token id when logprobs were asked for
    finished: bool = False
    finish_reason: str | None = None


class OutputProcessor:
    """Turns one request's generated tokens into text deltas."""

    def __init__(self, tokenizer, params: SamplingParams):
        if tokenizer is None and params.stop:
            raise InvalidRequestError("stop strings need a model with a tokenizer", param="stop")
        self.params = params
        self._detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self._stops = params.stop
        self._pending = ""  # released by the detokenizer, not yet emitted
        self.text = ""  # emitted so far
        self.token_ids: list[int] = []
        self.logprobs: list[SampledToken] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: SampledToken | None, finish_reason: str | None = None) -> OutputDelta:
        """Add one generated token (or none) and the engine's finish reason, if it ended."""
        if self.finished:
            return OutputDelta("", (), (), True, self.finish_reason)
        ids: tuple[int, ...] = ()
        logprobs: tuple[SampledToken, ...] = ()
        if token is not None:
            ids = (token.token_id,)
            self.token_ids.append(token.token_id)
            if self.params.logprobs is not None:
                logprobs = (token,)
                self.logprobs.append(token)
            if self._detokenizer is not None:
                self._pending += self._detokenizer.push(token.token_id)
        text = self._release_text()
        if self.finish_reason is None and finish_reason is not None:
            text += self._pending  # the engine ended it: nothing can match any more
            self._pending = ""
            self.finish_reason = finish_reason
        self.text += text
        return OutputDelta(text, ids, logprobs, self.finished, self.finish_reason)

    def _release_text(self) -> str:
        """Emit pending text up to a stop string (finishing) or up to a possible one."""
        if not self._stops or not self._pending:
            text, self._pending = self._pending, ""
            return text
        # A stop string never straddles emitted text: a tail that could start one is held.
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            text, self._pending = self._pending[:min(hits)], ""
            self.finish_reason = "stop"
            return text
        hold = len(self._pending)
        longest = max(len(s) for s in self._stops)
        for i in range(max(0, len(self._pending) - longest + 1), len(self._pending)):
            tail = self._pending[i:]
            if any(s.startswith(tail) for s in self._stops):
                hold = i
                break
        text, self._pending = self._pending[:hold], self._pending[hold:]
        return text
