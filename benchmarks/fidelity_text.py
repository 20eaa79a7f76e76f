"""Long natural text available offline: the Python standard library's own sources.

Files are read in sorted path order from the running interpreter's ``stdlib`` directory, each
tokenized once; a sample of ``L`` tokens is a window of one file (non-overlapping, at most
``MAX_WINDOWS_PER_FILE`` per file so that no single module dominates). Deterministic for an
interpreter version (recorded in the results). A file of fewer UTF-8 bytes than ``L`` cannot
hold ``L`` tokens (every byte-level BPE token covers at least one byte), so it is not tokenized
for that length; the others are tokenized in batches (the fast tokenizer runs a batch on every
core). Neither changes which windows come out.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

MAX_WINDOWS_PER_FILE = 2
TOKENIZE_BATCH = 16


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


class StdlibCorpus:
    """Token windows of the standard library's sources, tokenized lazily and kept."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.files = stdlib_sources()
        self._text: dict[int, str] = {}
        self._tokens: dict[int, list[int]] = {}

    def _read(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = self.files[i].read_text(encoding="utf-8", errors="replace")
        return self._text[i]

    def _tokenize(self, indices: list[int]) -> None:
        todo = [i for i in indices if i not in self._tokens]
        if todo:
            ids = self.tokenizer([self._read(i) for i in todo],
                                 add_special_tokens=False)["input_ids"]
            self._tokens.update(zip(todo, ids))

    def windows(self, num_tokens: int, num_samples: int) -> list[list[int]]:
        out: list[list[int]] = []
        candidates = (i for i in range(len(self.files))
                      if len(self._read(i).encode("utf-8")) >= num_tokens)
        while len(out) < num_samples:
            batch = [i for _, i in zip(range(TOKENIZE_BATCH), candidates)]
            if not batch:
                if not out:
                    raise ValueError(f"the standard library holds no window of {num_tokens} "
                                     "tokens")
                break  # fewer windows than asked: the cell reports its own n_samples
            self._tokenize(batch)
            for i in batch:
                ids = self._tokens[i]
                for w in range(min(len(ids) // num_tokens, MAX_WINDOWS_PER_FILE)):
                    if len(out) < num_samples:
                        out.append(ids[w * num_tokens:(w + 1) * num_tokens])
        return out
