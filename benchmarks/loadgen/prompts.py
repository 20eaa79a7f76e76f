"""Prompt bodies of a given token length: token ids (random-weight models, any server that
takes a list of ids as ``prompt``) or text from a local tokenizer (real models).

Token ids are drawn uniformly from ``[first_id, vocab_size)`` with the request's own seed, so
two runs send the same prompts. Text prompts decode random ids and re-encode them, trimming
until the local tokenizer counts exactly the asked length (the server's own count, in
``usage.prompt_tokens``, is what the report keeps: tokenizers differ, chat templates add tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenIdPrompts:
    kind = "token_ids"

    def __init__(self, vocab_size: int = 512, first_id: int = 3, seed: int = 0):
        if vocab_size <= first_id:
            raise ValueError("vocab_size must exceed first_id")
        self.vocab_size, self.first_id, self.seed = vocab_size, first_id, seed

    def build(self, index: int, num_tokens: int) -> list[int]:
        rng = np.random.default_rng((self.seed, index))
        return rng.integers(self.first_id, self.vocab_size, size=num_tokens).tolist()


class TextPrompts:
    kind = "text"

    def __init__(self, tokenizer_path: str | Path, seed: int = 0):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self.seed = seed
        # Ordinary tokens only (no specials), so the decoded text re-encodes to similar ids.
        special = set(self.tokenizer.all_special_ids)
        self._ids = np.array([i for i in range(len(self.tokenizer)) if i not in special])

    def build(self, index: int, num_tokens: int) -> str:
        rng = np.random.default_rng((self.seed, index))
        ids = rng.choice(self._ids, size=num_tokens).tolist()
        text = self.tokenizer.decode(ids)
        for _ in range(8):  # re-encoding merges or splits a few tokens: trim or pad
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == num_tokens:
                break
            if len(encoded) > num_tokens:
                encoded = encoded[:num_tokens]
            else:
                encoded = encoded + rng.choice(self._ids, size=num_tokens - len(encoded)).tolist()
            text = self.tokenizer.decode(encoded)
        return text

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
