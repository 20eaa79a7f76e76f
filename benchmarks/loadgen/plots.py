"""PNG plots of load-generator runs (matplotlib, Agg backend; imported only when asked for):
TTFT CDF per run, TTFT vs prompt length, and latency vs request rate across a sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict) -> str:
    rate = row.get("request_rate")
    if rate is not None:
        return f"{rate:g} req/s"
    return f"concurrency {row.get('max_concurrency')}"


def plot_runs(rows: list[dict], out_dir: Path, prefix: str) -> list[Path]:
    """``rows``: summary rows that carry their per-request ``requests``."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ttft = np.sort([r["ttft_s"] for r in row["requests"] if r["success"]])
        if ttft.size:
            ax.step(ttft, np.arange(1, ttft.size + 1) / ttft.size, where="post",
                    label=_label(row))
    ax.set(xlabel="TTFT (s)", ylabel="fraction of requests", title=f"{prefix}: TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / f"{prefix}_ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ok = [r for r in row["requests"] if r["success"]]
        ax.scatter([r["server_prompt_tokens"] or r["prompt_tokens"] for r in ok],
                   [r["ttft_s"] for r in ok], s=10, label=_label(row))
    ax.set(xlabel="prompt tokens", ylabel="TTFT (s)", title=f"{prefix}: TTFT vs prompt length")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / f"{prefix}_ttft_vs_prompt.png"))

    rated = sorted((r for r in rows if r.get("request_rate") is not None),
                   key=lambda r: r["request_rate"])
    if len(rated) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["request_rate"] for r in rated]
        for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p90_s", "TTFT p90"),
                           ("ttft_p99_s", "TTFT p99"), ("e2el_p50_s", "e2e p50")):
            ax.plot(x, [r[key] for r in rated], marker="o", label=label)
        ax.set(xlabel="request rate (req/s)", ylabel="latency (s)",
               title=f"{prefix}: latency vs request rate")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / f"{prefix}_latency_vs_rate.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.loadgen.plots serve_<setup>.json... --plot-dir DIR``: plots of
    results written elsewhere (a machine without matplotlib)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--plot-dir", type=Path, required=True)
    args = p.parse_args(argv)
    for path in args.results:
        payload = json.loads(path.read_text())
        for plot in plot_runs(payload["rows"], args.plot_dir, path.stem):
            print(f"plot: {plot}")


if __name__ == "__main__":
    main()
