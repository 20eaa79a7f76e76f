"""The cost model: fits recover known coefficients, the stored defaults are the fits of the
measured results files, and scaling to another model or thread count is what it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.fit_cost_model import close, fit_cpu, fit_gpu
from disagg import cost_defaults
from disagg.cost_model import (
    DecodeCost,
    ModelShape,
    PrefillCost,
    fit_decode,
    fit_prefill,
    fit_transfer,
    nonnegative_lstsq,
)

TRUE = PrefillCost(fixed_s=0.03, per_token_s=2e-5, per_token2_s=5e-10, triangle_per_token_s=3e-6)


def test_fit_prefill_recovers_dense_and_triangle_terms():
    rows = [(b, n, f, TRUE.seconds(n * 1, triangle_fraction=f) if b == 1 else
             b * (TRUE.seconds(n, triangle_fraction=f) - TRUE.fixed_s) + TRUE.fixed_s)
            for b, n, f in [(1, 8192, 0.0), (1, 32768, 0.0), (1, 131072, 0.0), (4, 4096, 0.0),
                            (1, 32768, 0.5), (1, 131072, 0.5)]]
    fitted = fit_prefill(rows)
    for field in dataclasses.fields(PrefillCost):
        assert getattr(fitted, field.name) == pytest.approx(getattr(TRUE, field.name), rel=1e-6)
    # A Triangle layer is nearly linear: all-Triangle prefill has no quadratic growth.
    assert fitted.seconds(2 * 131072, triangle_fraction=1.0) < \
        2.01 * fitted.seconds(131072, triangle_fraction=1.0)


def test_fit_decode_and_transfer_recover_coefficients():
    true = DecodeCost(0.0055, 7e-6, 3e-8)
    rows = [(b, c, true.step_s(b, b * c)) for b, c in [(1, 4096), (8, 4096), (32, 4096),
                                                       (1, 32768), (1, 131072)]]
    fitted = fit_decode(rows)
    assert (fitted.fixed_s, fitted.per_seq_s, fitted.per_context_token_s) == pytest.approx(
        (true.fixed_s, true.per_seq_s, true.per_context_token_s), rel=1e-6)
    # One context length cannot tell KV reads from per-sequence work: no context term.
    flat = fit_decode([(1, 128, 0.08), (8, 128, 0.16), (32, 128, 0.25)])
    assert flat.per_context_token_s == 0.0 and flat.per_seq_s > 0
    t = fit_transfer("object_store", [(1 << 30, 0.2), (4 << 30, 0.65), (16 << 30, 2.5)])
    assert t.fixed_s >= 0 and t.seconds(8 << 30) == pytest.approx(1.3, rel=0.1)


def test_nonnegative_lstsq_drops_a_term_that_would_go_negative():
    x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    y = np.array([3.0, 2.0, 1.0])  # falls with x: the slope would be -1
    coef = nonnegative_lstsq(x, y)
    assert coef[1] == 0.0 and coef[0] == pytest.approx(2.0)


@pytest.mark.parametrize("name, fit", [("cpu", fit_cpu), ("gpu", fit_gpu)])
def test_stored_defaults_are_the_fits_of_the_results_files(name, fit):
    stored = getattr(cost_defaults, f"{name}_default")()
    assert close(fit(), stored), "stale: run python -m benchmarks.fit_cost_model --write"
    assert "benchmarks/results/" in stored.source


def test_gpu_fit_reproduces_the_measured_prefill():
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).parents[2] / "benchmarks/results/ttft.json").read_text())
    model = cost_defaults.gpu_default()
    for r in rows["rows"]:
        f = 0.0 if r["mode"] == "dense" else 0.5  # Llama-3.1-8B: layers 16-31 Triangle
        assert model.prefill_s(r["prompt_tokens"], triangle_fraction=f) == pytest.approx(
            r["ours_s"], rel=0.1)


def test_scaling_to_another_model_and_thread_count():
    base = cost_defaults.cpu_default()
    assert close(base.for_model(base.shape, threads=base.threads).prefill, base.prefill)
    one_thread = base.for_model(base.shape, threads=1)
    assert one_thread.prefill_s(1000) == pytest.approx(2 * base.prefill_s(1000))
    tiny = ModelShape(4, 64, 160, 4, 2, 16)
    assert base.for_model(tiny).prefill_s(1000) < base.prefill_s(1000) / 50
    assert base.for_model(tiny).shape == tiny


def test_calibration_follows_measured_prefill_within_bounds():
    from disagg.cost_model import PrefillCalibration

    base = cost_defaults.cpu_default()
    cal = PrefillCalibration()
    assert close(cal.apply(base), base)
    for _ in range(60):
        cal.observe(predicted_s=1.0, measured_s=2.0)
    assert cal.factor == pytest.approx(2.0, rel=1e-3)
    assert cal.apply(base).prefill_s(1000) == pytest.approx(2 * base.prefill_s(1000), rel=1e-3)
    for _ in range(60):
        cal.observe(predicted_s=1.0, measured_s=100.0)  # an outlier cannot run away
    assert cal.factor == pytest.approx(cal.hi, rel=1e-3)
    cal.observe(predicted_s=0.0, measured_s=1.0)  # nothing to learn from
    assert cal.factor == pytest.approx(cal.hi, rel=1e-3)
