"""The simulator's costs, fitted from component benchmarks only (never from end-to-end runs
under load): a ``disagg.cost_model.CostModel`` (the router's own cost language) plus the
serving layer's fixed overhead per request.

- H200, random Llama-3.1-8B bf16 (``h200_llama8b``): prefill from ``ttft.json`` (dense and
  TriangleMix rows, engine alone) and the engine rows of ``kv_handoff.json`` (TriangleMix),
  fitted jointly; decode step from ``decode_itl.json`` (batch x context),
  exposed KV transfer from ``kv_handoff.json`` (cuda_ipc on one GPU), the serving layer's
  overhead from ``kv_handoff.json`` (served TTFT - engine TTFT, single isolated requests).
  NVLink and network links are priced from the measured NCCL send/recv rate (DESIGN.md §5,
  369 GB/s) and an assumed 400 Gb/s (50 GB/s) network. Sequence parallelism: an SP group of
  ``s`` GPUs takes ``t1(n) / s + c_s`` -- ``c_s`` the per-rank work that does not shrink with
  the shard plus the exchange, fitted per degree from ``sequence_parallel.json`` (per-rank work
  timed on one GPU, collectives priced at the measured link rate; 32K and 128K, dense and
  TriangleMix); SP degrees it does not list fall back to ``CostModel``'s ``sp * 0.9``.
- CPU (``from_calibration``): ``sim_calibration_<setup>.json`` written by
  ``benchmarks.simulator.calibrate`` on the machine that runs the app.
- ``load_contention``: prefill / decode contention on a shared GPU from ``contention.json``
  (``benchmarks/contention.py``: each side timed alone and while the other runs), used by
  setups whose prefill and decode share a GPU (``ClusterSpec.shared_gpu``).
- ``with_served_corrections``: where isolated requests (concurrency 1, no queueing) against
  the app were recorded, the serving layer's share is fitted from them: the served prefill's
  excess over the engine benchmark (the replica's own ``disagg_timing.prefill_s`` minus the
  engine fit: KV writes, threads, the GPU shared with decode) and the time outside prefill
  (TTFT - ``prefill_s``). Runs under load are never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR
from disagg.cost_model import (
    CostModel,
    ModelShape,
    PrefillCost,
    TransferCost,
    fit_decode,
    fit_prefill,
    fit_transfer,
    nonnegative_lstsq,
)
from disagg.models.random_configs import RANDOM_CONFIGS

NVLINK_BYTES_PER_S = 369e9  # NCCL send/recv between two H200s (DESIGN.md §5)
NETWORK_BYTES_PER_S = 50e9  # assumption: one 400 Gb/s NIC per GPU
SP_EFFICIENCY = 0.9  # assumption until sequence parallelism is measured
LLAMA8B_TRIANGLE_FRACTION = 0.5  # layers 16-31 of 32 (DESIGN.md §1)


@dataclass(frozen=True)
class Overhead:
    """Serving-layer seconds a request spends outside prefill before its first token
    (HTTP, tokenize / JSON ids, routing, the decode -> prefill hop, streaming back)."""

    fixed_s: float
    per_token_s: float

    def seconds(self, num_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * num_tokens

    @classmethod
    def fit(cls, rows: list[tuple[int, float]]) -> Overhead:
        x = np.array([[1.0, float(n)] for n, _ in rows])
        fixed, per = nonnegative_lstsq(x, np.array([s for _, s in rows]))
        return cls(float(fixed), float(per))


@dataclass(frozen=True)
class Contention:
    """Slowdown factors (>= 1) of each side while the other runs on the same GPU: a prefill
    progresses at ``1 / prefill_slowdown`` of its speed during a decode step, and a decode step
    takes ``decode_slowdown`` times longer while a prefill runs."""

    prefill_slowdown: float
    decode_slowdown: float
    source: str = ""

    def __post_init__(self):
        if self.prefill_slowdown < 1 or self.decode_slowdown < 1:
            raise ValueError("contention slowdowns are >= 1")


@dataclass(frozen=True)
class Calibration:
    cost: CostModel
    overhead: Overhead  # before routing (outside prefill)
    kv_bytes_per_token: int
    triangle_fraction: float
    sources: tuple[str, ...]
    prefill_excess: Overhead = Overhead(0.0, 0.0)  # served prefill over the engine's
    sp_overhead_s: tuple[tuple[int, float], ...] = ()  # (SP degree, c_s seconds)
    # Shared-GPU setups: measured contention; None: a decode step overlapping a prefill
    # delays it by the step's whole length (serialized, the upper bound).
    contention: Contention | None = None

    def prefill_s(self, num_tokens: int, *, sp: int = 1, triangle_fraction: float = 0.0
                  ) -> float:
        """A prefill group's service time (engine cost + the served path's excess)."""
        c = dict(self.sp_overhead_s).get(sp)
        if sp > 1 and c is not None:
            engine = self.cost.prefill_s(num_tokens, triangle_fraction=triangle_fraction) / sp + c
        else:
            engine = self.cost.prefill_s(num_tokens, sp=sp, triangle_fraction=triangle_fraction)
        return engine + self.prefill_excess.seconds(num_tokens)


def fit_prefill_joint(rows: list[tuple[int, float, float]]) -> PrefillCost:
    """(tokens, triangle_fraction, seconds) rows of dense and TriangleMix prefills, fitted
    together: ``fixed + n * lin + (1 - f) * n^2 * quad + f * n * tri`` (non-negative)."""
    x = np.array([[1.0, n, (1 - f) * n * n, f * n] for n, f, _ in rows], dtype=float)
    scale = np.abs(x).max(axis=0)
    coef = nonnegative_lstsq(x / scale, np.array([t for *_, t in rows])) / scale
    return PrefillCost(*(float(c) for c in coef))


def _shape(name: str) -> ModelShape:
    c = RANDOM_CONFIGS[name]
    heads = c["num_attention_heads"]
    return ModelShape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                      c["num_key_value_heads"], c.get("head_dim", c["hidden_size"] // heads))


def _rows(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"]


def h200_llama8b(results: Path = RESULTS_DIR) -> Calibration:
    shape = _shape("llama-3.1-8b")
    ttft = _rows(results / "ttft.json")
    handoff = [r for r in _rows(results / "kv_handoff.json") if r["backend"] == "cuda_ipc"]
    prefill = fit_prefill_joint(
        [(r["prompt_tokens"], LLAMA8B_TRIANGLE_FRACTION if r["mode"] == "trianglemix" else 0.0,
          r["ours_s"]) for r in ttft]
        + [(r["context_tokens"], LLAMA8B_TRIANGLE_FRACTION, r["engine_ttft_s"])
           for r in handoff])
    decode = fit_decode([(r["batch"], r["context_tokens"], r["itl_ms"] / 1e3)
                         for r in _rows(results / "decode_itl.json")])
    same_gpu = fit_transfer("cuda_ipc", [(r["kv_bytes"], r["transfer_ms"] / 1e3)
                                         for r in handoff])
    kv = shape.kv_bytes_per_token
    transfers = (same_gpu, TransferCost("nvlink", same_gpu.fixed_s, 1 / NVLINK_BYTES_PER_S),
                 TransferCost("network", same_gpu.fixed_s, 1 / NETWORK_BYTES_PER_S))
    # The hop's cost is inside the measured served-vs-engine overhead below.
    overhead = Overhead.fit([(r["context_tokens"], r["served_ttft_s"] - r["engine_ttft_s"])
                             for r in handoff])
    dense_kv = kv * (1 - LLAMA8B_TRIANGLE_FRACTION)
    cost = CostModel(prefill, decode, transfers, remote_overhead_s=0.0, shape=shape,
                     sp_efficiency=SP_EFFICIENCY, sp_per_token_s=dense_kv / NVLINK_BYTES_PER_S,
                     source="ttft.json, decode_itl.json, kv_handoff.json")
    sources = ["ttft.json", "decode_itl.json", "kv_handoff.json"]
    sp_overhead = ()
    if (results / "sequence_parallel.json").exists():
        sp_overhead = fit_sp_overhead(_rows(results / "sequence_parallel.json"))
        sources.append("sequence_parallel.json")
    return Calibration(cost, overhead, kv, LLAMA8B_TRIANGLE_FRACTION, tuple(sources),
                       sp_overhead_s=sp_overhead)


def load_contention(results: Path = RESULTS_DIR) -> Contention | None:
    """The ``slowdown`` of ``contention.json`` (``benchmarks/contention.py``), clamped to >= 1
    (a factor under 1 is noise); None when that file is absent."""
    path = Path(results) / "contention.json"
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    factors = payload["slowdown"]
    return Contention(max(1.0, float(factors["prefill"])), max(1.0, float(factors["decode"])),
                      source=f"{path.name} ({payload.get('mode', 'thread')}, "
                             f"{payload.get('commit', '?')})")


def fit_sp_overhead(rows: list[dict]) -> tuple[tuple[int, float], ...]:
    """``c_s`` = mean over (length, mode) of ``ttft(s) - ttft(1) / s`` (up to 128K)."""
    one = {(r["context_tokens"], r["mode"]): r["ttft_s"] for r in rows
           if r["sp"] == 1 and r["context_tokens"] <= 131072}
    out = []
    for sp in sorted({r["sp"] for r in rows if r["sp"] > 1}):
        extra = [r["ttft_s"] - one[(r["context_tokens"], r["mode"])] / sp for r in rows
                 if r["sp"] == sp and (r["context_tokens"], r["mode"]) in one]
        if extra:
            out.append((sp, max(0.0, float(np.mean(extra)))))
    return tuple(out)


def from_calibration(path: Path, overhead_rows: list[tuple[int, float]],
                     model: str = "smollm2-135m") -> Calibration:
    """A CPU setup: the calibrate CLI's rows, and (prompt tokens, served TTFT - prefill)
    of isolated requests for the overhead."""
    payload = json.loads(Path(path).read_text())
    rows = payload["rows"]
    prefill = fit_prefill([(1, r["prompt_tokens"], 0.0, r["seconds"])
                           for r in rows if r["kind"] == "prefill"])
    decode = fit_decode([(r["batch"], r["context_tokens"], r["step_s"])
                         for r in rows if r["kind"] == "decode"])
    shape = _shape(model)
    cost = CostModel(prefill, decode, (TransferCost("object_store", 0.0, 0.0),),
                     remote_overhead_s=0.0, shape=shape, threads=payload.get("threads", 1),
                     source=str(Path(path).name))
    return Calibration(cost, Overhead.fit(overhead_rows), shape.kv_bytes_per_token * 2,  # fp32
                       0.0, (str(Path(path).name),))


def with_served_corrections(cal: Calibration, isolated: list[dict], source: str
                            ) -> Calibration:
    """``cal`` with the serving layer's share fitted from isolated requests (load-generator
    records carrying ``timing.prefill_s``)."""
    rows = [(r["server_prompt_tokens"] or r["prompt_tokens"], r) for r in isolated
            if r["success"] and r.get("timing")]
    excess = Overhead.fit([(n, r["timing"]["prefill_s"] - cal.cost.prefill_s(
        n, triangle_fraction=cal.triangle_fraction)) for n, r in rows])
    outside = Overhead.fit([(n, r["ttft_s"] - r["timing"]["prefill_s"]) for n, r in rows])
    return replace(cal, overhead=outside, prefill_excess=excess,
                   sources=(*cal.sources, source))
