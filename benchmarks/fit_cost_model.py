"""Fit the router's cost model (``disagg/cost_model.py``) from the measured results files.

    python -m benchmarks.fit_cost_model            # print both fits
    python -m benchmarks.fit_cost_model --check    # exit 1 if disagg/cost_defaults.py is stale

GPU (one H200, random Llama-3.1-8B, bf16): prefill from ``ttft.json`` (dense and TriangleMix
rows; the Triangle fraction is the model's published split), decode steps from
``decode_itl.json``, exposed KV transfer per backend and the remote hop from
``kv_handoff.json`` (token 0 -> 1 less one decode step; served TTFT less the server's prefill,
less the local path's HTTP overhead of ``serving_overhead.json``).
CPU (SmolLM2-135M, fp32, 2 threads): prefill from ``model_cpu.json`` and the batched prefills
of ``decode_cpu.json``, decode steps from ``decode_cpu.json``; the hop and the object-store
transfer (the server's ``disagg_timing.transfer_s``) from ``routing_cpu.json`` (the served
app on CPU, ``benchmarks/routing_cpu.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pprint
import statistics
import sys
import textwrap
from pathlib import Path

from benchmarks.common import RESULTS_DIR
from disagg.attention.triangle import published_trianglemix
from disagg.cost_model import (
    CostModel,
    ModelShape,
    TransferCost,
    fit_decode,
    fit_prefill,
    fit_transfer,
)
from disagg.models.config import ModelConfig
from disagg.models.random_configs import RANDOM_CONFIGS


def _rows(results: Path, name: str) -> list[dict]:
    return json.loads((results / f"{name}.json").read_text())["rows"]


def _shape(name: str) -> ModelShape:
    return ModelShape.of(ModelConfig.from_hf_dict(RANDOM_CONFIGS[name]))


def fit_gpu(results: Path = RESULTS_DIR) -> CostModel:
    shape = _shape("llama-3.1-8b")
    tm = published_trianglemix("llama-3.1-8b")
    fraction = len(tm.triangle_layers) / shape.num_layers
    prefill = fit_prefill([(1, r["prompt_tokens"], 0.0 if r["mode"] == "dense" else fraction,
                            r["ours_s"]) for r in _rows(results, "ttft")])
    decode = fit_decode([(r["batch"], r["context_tokens"], r["itl_ms"] / 1e3)
                         for r in _rows(results, "decode_itl")])
    handoff = _rows(results, "kv_handoff")
    transfers = tuple(
        fit_transfer(b, [(r["kv_bytes"], max(0.0, r["token0_to_token1_s"]
                                               - r["engine_decode_step_ms"] / 1e3))
                         for r in handoff if r["backend"] == b])
        for b in dict.fromkeys(r["backend"] for r in handoff))
    local_ms = statistics.median(r["ttft_overhead_ms"] for r in _rows(results, "serving_overhead"))
    hop = statistics.median(r["served_ttft_s"] - r["server_prefill_s"] for r in handoff)
    return CostModel(prefill, decode, transfers, max(0.0, hop - local_ms / 1e3), shape,
                     threads=0, source="GPU fit: benchmarks/results/ttft.json, decode_itl.json, "
                                       "kv_handoff.json, serving_overhead.json (one H200)")


def fit_cpu(results: Path = RESULTS_DIR) -> CostModel:
    shape = _shape("smollm2-135m")
    engine = [r for r in _rows(results, "decode_cpu") if r["engine"] == "DecodeEngine"]
    ours = [r for r in _rows(results, "model_cpu") if r["engine"] == "ours"]
    prefill = fit_prefill(
        [(r["batch_size"], r["prompt_tokens"], 0.0, r["prefill_s"]) for r in engine]
        + [(1, r["prompt_tokens"], 0.0, r["prompt_tokens"] / r["prefill_tokens_per_s"])
           for r in ours])
    decode = fit_decode([(r["batch_size"], r["prompt_tokens"], r["step_ms"] / 1e3)
                         for r in engine])
    if (results / "routing_cpu.json").exists():
        hop, transfer, where = _served_cpu(_rows(results, "routing_cpu"))
    else:  # until the CPU app is measured: the GPU machine's object-store hand-off and hop
        gpu = fit_gpu(results)
        hop, where = gpu.remote_overhead_s, "kv_handoff.json (GPU, no CPU measurement yet)"
        transfer = next(t for t in gpu.transfers if t.backend == "object_store")
    threads = {r["threads"] for r in engine + ours}
    if len(threads) != 1:
        raise ValueError(f"CPU rows measured with different thread counts: {threads}")
    return CostModel(prefill, decode, (transfer,), max(0.0, hop), shape, threads=threads.pop(),
                     source="CPU fit: benchmarks/results/model_cpu.json, decode_cpu.json, "
                            f"{where} (2 cores)")


def _served_cpu(rows: list[dict]) -> tuple[float, TransferCost, str]:
    """The hop (disaggregated less local TTFT at equal length) and the exposed object-store
    transfer (token 0 -> 1 less a decode step) measured on the served CPU app."""
    paths = [r for r in rows if r["kind"] == "path_ttft"]
    by_len: dict[int, dict[str, float]] = {}
    for r in paths:
        by_len.setdefault(r["prompt_tokens"], {})[r["path"]] = r["ttft_s"]
    hop = statistics.median(v["disaggregated"] - v["local"] for v in by_len.values()
                            if len(v) == 2)
    transfer = fit_transfer("object_store", [(r["kv_bytes"], r["transfer_s"])
                                              for r in paths if r["path"] == "disaggregated"])
    return hop, transfer, "routing_cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if disagg/cost_defaults.py differs from the fits")
    parser.add_argument("--write", action="store_true", help="rewrite disagg/cost_defaults.py")
    args = parser.parse_args(argv)
    fits = {"cpu": fit_cpu(), "gpu": fit_gpu()}
    if args.write:
        DEFAULTS_PATH.write_text(render_defaults(fits["cpu"], fits["gpu"]))
    from disagg import cost_defaults

    stored = {"cpu": cost_defaults.cpu_default(), "gpu": cost_defaults.gpu_default()}
    stale = False
    for name, fitted in fits.items():
        print(f"{name}: {fitted!r}")
        if not close(fitted, stored[name]):
            stale = True
            print(f"{name}: disagg/cost_defaults.py differs from the fit", file=sys.stderr)
    return 1 if args.check and stale else 0


DEFAULTS_PATH = Path(__file__).resolve().parents[1] / "disagg" / "cost_defaults.py"


def close(a, b, rel: float = 1e-9) -> bool:
    """Two cost models equal up to float rounding of the fit (field by field)."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(close(getattr(a, f.name), getattr(b, f.name), rel)
                   for f in dataclasses.fields(a))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)
    return a == b


def render_defaults(cpu: CostModel, gpu: CostModel) -> str:
    body = {name: textwrap.indent(pprint.pformat(m, width=90), " " * 8)
            for name, m in (("cpu", cpu), ("gpu", gpu))}
    return f'''"""The router's fitted cost models (written by ``python -m benchmarks.fit_cost_model
--write`` from the measured ``benchmarks/results/*.json``; a test re-fits and compares).
Each model's ``source`` names the files it was fitted from."""

from __future__ import annotations

from disagg.cost_model import CostModel, DecodeCost, ModelShape, PrefillCost, TransferCost


def cpu_default() -> CostModel:
    return (
{body['cpu']}
    )


def gpu_default() -> CostModel:
    return (
{body['gpu']}
    )
'''


if __name__ == "__main__":
    sys.exit(main())
