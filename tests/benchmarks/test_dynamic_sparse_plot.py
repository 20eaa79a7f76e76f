"""The TTFT-vs-density plot of ``benchmarks.dynamic_sparse`` from a results file."""

from __future__ import annotations

import json

from benchmarks.dynamic_sparse import plot


def test_plot_draws_every_mode_from_a_results_file(tmp_path):
    rows = [{"context_tokens": 131072, "mode": "dense", "density": 1.0, "ttft_s": 11.0},
            {"context_tokens": 131072, "mode": "trianglemix", "density": None, "ttft_s": 7.0}]
    rows += [{"context_tokens": 131072, "mode": "trianglemix+dynamic", "density": d,
              "ttft_s": t} for d, t in ((0.2, 4.2), (0.5, 5.7), (0.35, 5.0))]
    path = tmp_path / "dynamic_sparse.json"
    path.write_text(json.dumps({"model": "m", "device": "d", "smollm2_density": 0.23,
                                "rows": rows}))
    out = plot(path)
    assert out == tmp_path / "dynamic_sparse.png" and out.stat().st_size > 10_000
