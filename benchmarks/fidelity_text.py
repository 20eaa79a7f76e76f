"""Long natural text available offline: the Python standard library's own sources.

Files are read in sorted path order from the running interpreter's ``stdlib`` directory, each
tokenized once; a sample of ``L`` tokens is a window of one file (non-overlapping, at most
``MAX_WINDOWS_PER_FILE`` per file so that no single module dominates). Deterministic for an
interpreter version (recorded in the results).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

MAX_WINDOWS_PER_FILE = 2


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


class StdlibCorpus:
    """Token windows of the standard library's sources, tokenized lazily and kept."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.files = stdlib_sources()
        self._tokens: list[list[int]] = []

    def windows(self, num_tokens: int, num_samples: int) -> list[list[int]]:
        out: list[list[int]] = []
        i = 0
        while len(out) < num_samples:
            if i == len(self._tokens):
                if i == len(self.files):
                    raise ValueError(f"the standard library holds only {len(out)} windows of "
                                     f"{num_tokens} tokens")
                text = self.files[i].read_text(encoding="utf-8", errors="replace")
                self._tokens.append(self.tokenizer.encode(text, add_special_tokens=False))
            ids = self._tokens[i]
            for w in range(min(len(ids) // num_tokens, MAX_WINDOWS_PER_FILE)):
                if len(out) < num_samples:
                    out.append(ids[w * num_tokens:(w + 1) * num_tokens])
            i += 1
        return out
