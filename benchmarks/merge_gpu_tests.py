"""Merge a GPU session's test summaries into ``benchmarks/results/gpu_tests.json``.

    python -m benchmarks.merge_gpu_tests NAME=PATH [NAME=PATH ...]

Each PATH is a summary the test run wrote (``DISAGG_GPU_TESTS_JSON``: commit, device,
selection, passed, failed, skipped, failures); it replaces suite NAME, the others are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR


def merge(pairs: list[str], path: Path = RESULTS_DIR / "gpu_tests.json") -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"suites": {}}
    for pair in pairs:
        name, _, source = pair.partition("=")
        if not name or not source:
            raise SystemExit(f"expected NAME=PATH, got {pair!r}")
        data["suites"][name] = json.loads(Path(source).read_text())
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    for name, suite in merge(sys.argv[1:])["suites"].items():
        print(f"{name}: {suite['passed']} passed, {suite['failed']} failed, "
              f"{suite['skipped']} skipped at {suite['commit'][:7]}")
