"""Validation shared by every entry point: prompt token ids against the model's limits."""

from __future__ import annotations

from collections.abc import Sequence

from disagg.errors import ContextLengthError, InvalidRequestError


def validate_prompt(prompt_ids: Sequence[int], *, vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt"
        )


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, *, context: int) -> int:
    """vLLM's length rule: prompt + max_tokens <= context; None means whatever remains."""
    remaining = context - num_prompt_tokens
    if remaining < 1:
        raise ContextLengthError(
            f"the prompt has {num_prompt_tokens} tokens; this model's context is {context} "
            "tokens, which leaves no room to generate",
            param="prompt",
        )
    if max_tokens is None:
        return remaining
    if max_tokens > remaining:
        raise ContextLengthError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this "
            f"model's context of {context} tokens",
            param="max_tokens",
        )
    return max_tokens
