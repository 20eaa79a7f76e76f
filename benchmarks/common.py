"""Shared plumbing of the benchmark CLIs: the results file of DESIGN.md §6.

``benchmarks/results/<benchmark>.json`` = ``{"benchmark", "commit", "dirty", "device",
"versions", "rows"}``. The commit is taken on the development machine and passed in
(``--commit`` or env ``DISAGG_COMMIT``) when the run happens where there is no ``.git``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_provenance_args(parser: argparse.ArgumentParser) -> None:
    """``--commit`` / ``--dirty`` / ``--out`` on every benchmark CLI."""
    parser.add_argument("--commit", default=None,
                        help="commit the code came from (default: env DISAGG_COMMIT, then git)")
    parser.add_argument("--dirty", action="store_true", default=None,
                        help="the working tree had uncommitted changes (default: env "
                             "DISAGG_DIRTY, then git status)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON path (default: benchmarks/results/<benchmark>.json)")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def resolve_commit(commit: str | None = None) -> str:
    return commit or os.environ.get("DISAGG_COMMIT") or _git("rev-parse", "HEAD") or "unknown"


def resolve_dirty(dirty: bool | None = None) -> bool:
    if dirty is not None:
        return dirty
    env = os.environ.get("DISAGG_DIRTY")
    if env is not None:
        return env.lower() in ("1", "true", "yes")
    status = _git("status", "--porcelain")
    return bool(status) if status is not None else True


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
    except ImportError:
        pass
    # Installed ones, read without importing; flash-attn-4 decides the dense-kernel pick.
    for package in ("triton", "ray", "orjson", "flash-attn-4"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_results(benchmark: str, rows: list[dict[str, Any]], *, commit: str | None = None,
                  dirty: bool | None = None, out: Path | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write the results JSON and return its path."""
    path = out or RESULTS_DIR / f"{benchmark}.json"
    payload = {
        "benchmark": benchmark,
        "commit": resolve_commit(commit),
        "dirty": resolve_dirty(dirty),
        "device": device_name(),
        "versions": versions(),
        **(extra or {}),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A short fixed-width table on stdout (the last thing a benchmark prints)."""
    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def unshared_state_dict(model) -> tuple[dict[str, Any], int]:
    """``model``'s state dict for a baseline built from the same weights, and the bytes copied:
    a tensor that is a view into a larger storage (our packed q/k/v and gate/up matrices) is
    copied into storage of its own, so the baseline holds plain parameters, as a user's would
    (measured on the H200: transformers' compiled decode ran 14.2 ms per step on views of our
    packs against 7.9 ms on plain tensors); every other tensor is shared, not copied."""
    state, copied = {}, 0
    for name, t in model.state_dict().items():
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
            copied += t.numel() * t.element_size()
        state[name] = t
    return state, copied
