"""The skinny matrix product (``disagg_kernels.gemv``) under TRITON_INTERPRET=1 against its
fp32 reference (fp32 inputs: the interpreter's bf16 is not the GPU's), its launcher's checks,
and the dispatch of ``disagg.models.linear`` (untuned and CPU shapes run ``F.linear``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from disagg_kernels.gemv import gemv_reference

from disagg.models import linear as lin

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests (no CUDA here)")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@interpreter
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_reference_on_ragged_shapes(m, bias):
    from disagg_kernels.gemv.launcher import gemv_triton

    n, k = 37, 100  # neither a multiple of the tiles: masked edges in N and K
    x, w = _randn(m, k), _randn(n, k, seed=1)
    b = _randn(n, seed=2) if bias else None
    out = torch.full((m, n), float("nan"))
    gemv_triton(x, w, b, out=out)
    torch.testing.assert_close(out, gemv_reference(x, w, b), atol=1e-4, rtol=1e-4)


@interpreter
def test_kernel_reads_rows_with_a_stride():
    """The down projection's input is the gate half of a packed [M, 2I] product."""
    from disagg_kernels.gemv.launcher import GemvConfig, gemv_triton

    packed, w = _randn(2, 2 * 48), _randn(24, 48, seed=1)
    gate = packed[:, :48]
    assert gate.stride(0) == 96
    out = gemv_triton(gate, w, config=GemvConfig(8, 16, num_warps=1, num_stages=1))
    torch.testing.assert_close(out, gemv_reference(gate.contiguous(), w), atol=1e-4, rtol=1e-4)


def test_launcher_refuses_what_it_cannot_run():
    pytest.importorskip("triton")
    from disagg_kernels.gemv.launcher import MAX_ROWS, gemv_triton

    w = _randn(8, 16)
    with pytest.raises(ValueError, match="at most"):
        gemv_triton(_randn(MAX_ROWS + 1, 16), w)
    with pytest.raises(ValueError, match="contiguous"):
        gemv_triton(_randn(1, 16), _randn(16, 8).t())
    with pytest.raises(ValueError, match="\\[M, K\\]"):
        gemv_triton(_randn(1, 15), w)


def test_linear_is_f_linear_on_cpu_even_with_a_choice(monkeypatch):
    x, w, b = _randn(1, 16), _randn(8, 16, seed=1), _randn(8, seed=2)
    lin._CHOICES[(1, 8, 16, torch.float32)] = object()  # would fail if it were used
    try:
        torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    finally:
        lin.reset_choices()


def test_tuning_on_cpu_or_when_disabled_records_nothing(monkeypatch):
    from helpers import random_model

    model, _ = random_model("tiny-llama")
    assert lin.tune_linears(model, (1, 2)) == [] and lin.choices() == {}
    monkeypatch.setenv(lin.ENV_VAR, "off")
    assert not lin.enabled()
