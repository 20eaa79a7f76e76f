"""Plot time vs context length from benchmarks/results/triangle_attention.json (needs matplotlib,
not a project dependency):  python -m benchmarks.kernels.plot_triangle_attention"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    data = json.loads((RESULTS / "triangle_attention.json").read_text())
    rows = data["rows"]
    n = [r["context_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in [("cudnn_dense_ms", "cuDNN dense causal (SDPA)"),
                       ("flexattention_ms", "FlexAttention, Triangle mask"),
                       ("ours_ms", "ours (Triton Triangle kernel)")]:
        ax.plot(n, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(n, [f"{x // 1024}K" for x in n])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("attention forward, ms (log)")
    s = data["shape"]
    ax.set_title(f"Triangle attention {data['params']['n_sink']}/{data['params']['n_window']}/"
                 f"{data['params']['n_last']}, {s['heads_q']}q/{s['heads_kv']}kv heads, "
                 f"d={s['head_dim']}, {s['dtype']}, {data['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = RESULTS / "triangle_attention.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
