"""Which kernel computes a linear layer on CUDA: cuBLAS (``F.linear``) or, for the few rows of
a decode step, the skinny Triton product (``disagg_kernels.gemv``), chosen per shape by
measurement.

Life of a choice:
1. At import every shape runs ``F.linear``.
2. ``tune_linears`` (the decode warm-up calls it before capturing its CUDA graphs) times, for
   each row count it is given and each distinct weight shape of the model, ``F.linear`` against
   the skinny product with each of its candidate tiles, and records the fastest.
3. ``linear`` runs a tuned shape's winner (a captured graph keeps the kernel it was captured
   with); every other shape, CPU tensors and prefill's long row counts run ``F.linear``.
``DISAGG_SKINNY_GEMM=off`` keeps ``F.linear`` everywhere (no tuning): the baseline of a
benchmark, or a way out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ENV_VAR = "DISAGG_SKINNY_GEMM"
MAX_TUNED_ROWS = 16


@dataclass(frozen=True)
class LinearTiming:
    """One tuning measurement: seconds per call of each candidate, and the winner."""

    rows: int
    out_features: int
    in_features: int
    seconds: dict[str, float]
    winner: str


_CHOICES: dict[tuple[int, int, int, torch.dtype], object] = {}  # -> GemvConfig


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "on").strip().lower() not in ("off", "0", "false")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]``, on the kernel tuned for its shape."""
    if x.is_cuda and x.shape[0] <= MAX_TUNED_ROWS and _CHOICES:
        cfg = _CHOICES.get((x.shape[0], weight.shape[0], weight.shape[1], x.dtype))
        if cfg is not None:
            from disagg_kernels.gemv.launcher import gemv_triton

            return gemv_triton(x, weight, bias, config=cfg)
    return F.linear(x, weight, bias)


def _weight_shapes(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One (weight, bias) per distinct weight shape the model's ``linear`` calls use."""
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
    layer = model.model.layers[0] if len(model.model.layers) else None
    candidates = [(model.lm_head.weight, None)]
    if layer is not None:
        attn, mlp = layer.self_attn, layer.mlp
        for pack in (attn._qkv, mlp._gate_up):
            if pack is not None:
                candidates.append((pack.weight, pack.bias))
        candidates += [(attn.o_proj.weight, attn.o_proj.bias),
                       (mlp.down_proj.weight, mlp.down_proj.bias)]
    for w, b in candidates:
        seen.setdefault(tuple(w.shape), (w, b))
    return list(seen.values())


def _time(fn, repeats: int = 20) -> float:
    """Median seconds per call of ``fn`` by CUDA events (after warm calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / repeats)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def tune_linears(model, rows: Iterable[int]) -> list[LinearTiming]:
    """Time ``F.linear`` against the skinny product's tiles for every row count in ``rows``
    (at most ``MAX_TUNED_ROWS``) and weight shape of ``model``; record the fastest."""
    device = next(model.parameters()).device
    if device.type != "cuda" or not enabled():
        return []
    from disagg_kernels.gemv.launcher import CONFIGS, gemv_triton

    timings = []
    for w, b in _weight_shapes(model):
        n, k = w.shape
        for m in sorted({r for r in rows if 0 < r <= MAX_TUNED_ROWS}):
            x = torch.randn(m, k, device=device, dtype=w.dtype)
            seconds = {"cublas": _time(lambda x=x, w=w, b=b: F.linear(x, w, b))}
            for cfg in CONFIGS:
                name = f"gemv_{cfg.block_n}x{cfg.block_k}_s{cfg.num_stages}"
                seconds[name] = _time(lambda x=x, w=w, b=b, cfg=cfg: gemv_triton(
                    x, w, b, config=cfg))
            winner = min(seconds, key=seconds.get)
            key = (m, n, k, w.dtype)
            if winner == "cublas":
                _CHOICES.pop(key, None)
            else:
                _CHOICES[key] = CONFIGS[list(seconds).index(winner) - 1]
            timings.append(LinearTiming(m, n, k, seconds, winner))
    return timings


def reset_choices() -> None:
    """Forget every tuned choice (tests, benchmark baselines)."""
    _CHOICES.clear()


def choices() -> dict:
    return dict(_CHOICES)
