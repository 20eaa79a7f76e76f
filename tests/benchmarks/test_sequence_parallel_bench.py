"""``benchmarks/sequence_parallel.py`` on CPU with a tiny model: the projection's rows (bytes
counted by the collectives equal the formula, SP=1 measured, the 1M rows projected) and the
measured mode over a real gloo group of two processes (``slow``)."""

from __future__ import annotations

import json

import pytest
import torch
from disagg_kernels.triangle_mix import TriangleParams

from benchmarks import sequence_parallel as bench
from disagg.kv.layout import KVLayout

TINY = ["--model", "tiny-llama", "--triangle-layers", "2", "3", "--triangle-params", "4", "32",
        "16", "--device", "cpu"]


def test_projection_rows(tmp_path):
    out = tmp_path / "sp.json"
    rows = bench.main([*TINY, "--lengths", "150", "301", "--sp", "2", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "sequence_parallel" and saved["rows"] == rows
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    for r in rows:
        for field in ("context_tokens", "mode", "sp", "source", "ttft_s",
                      "exchanged_bytes_dense_layer", "exchanged_bytes_triangle_layer",
                      "peak_gib_per_gpu"):
            assert field in r
        assert r["source"] == ("measured" if r["sp"] == 1 and r["context_tokens"] < 2**20
                               else "projected")
        params = TriangleParams(4, 32, 16) if r["mode"] == "trianglemix" else None
        assert (r["exchanged_bytes_dense_layer"], r["exchanged_bytes_triangle_layer"]) == \
            bench.exchanged_bytes(r["context_tokens"], r["sp"], layout, 4, params)
        assert r["ttft_s"] > 0
    assert {(r["context_tokens"], r["sp"]) for r in rows} >= {(2**20, 3), (301, 2), (150, 1)}
    # Triangle layers move far fewer bytes than dense ones once the prompt is long
    million = next(r for r in rows if r["context_tokens"] == 2**20 and r["sp"] == 2
                   and r["mode"] == "trianglemix")
    assert million["exchanged_bytes_triangle_layer"] * 100 < million["exchanged_bytes_dense_layer"]


@pytest.mark.slow
def test_measured_mode_over_a_gloo_group(tmp_path):
    rows = bench.main([*TINY, "--measured", "--lengths", "150", "--sp", "2",
                       "--out", str(tmp_path / "m.json")])
    assert {(r["mode"], r["sp"], r["source"]) for r in rows} == {
        ("dense", 1, "measured"), ("dense", 2, "measured"),
        ("trianglemix", 1, "measured"), ("trianglemix", 2, "measured")}
    assert all(len(r.get("rank_s", [0])) == r["sp"] or r["sp"] == 1 for r in rows)
