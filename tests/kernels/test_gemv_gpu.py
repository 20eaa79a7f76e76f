"""The skinny matrix product on CUDA (bf16): every candidate tile against the fp32 reference
on Llama-3.1-8B's decode shapes, NaN-poisoned outputs; the tuner recording a winner per shape
and ``linear`` running it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from disagg_kernels.gemv import gemv_reference

from disagg.models import linear as lin

pytestmark = pytest.mark.gpu
KERNEL_REL_RMS = 5e-3  # STYLE.md: bf16 kernels against an fp32 reference
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1536, 576)]


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_every_tile_matches_fp32(n, k, m):
    from disagg_kernels.gemv.launcher import CONFIGS, gemv_triton

    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = gemv_reference(x.float(), w.float(), b.float())
    for cfg in CONFIGS:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gemv_triton(x, w, b, config=cfg, out=out)
        assert torch.isfinite(out).all(), cfg
        assert rel_rms(out, ref) < KERNEL_REL_RMS, cfg
        assert rel_rms(out, F.linear(x, w, b)) < KERNEL_REL_RMS, cfg


def test_tuner_records_the_fastest_and_linear_runs_it():
    from disagg.models.loader import ModelSource, load_model

    model = load_model(ModelSource(name="random:smollm2-135m", random_config="smollm2-135m"),
                       device="cuda", dtype=torch.bfloat16)
    lin.reset_choices()
    try:
        timings = lin.tune_linears(model, (1, 2))
        assert {(t.rows, t.out_features, t.in_features) for t in timings} >= {
            (1, 576, 576), (2, 576, 1536)}
        for t in timings:
            assert t.seconds[t.winner] == min(t.seconds.values())
            key = (t.rows, t.out_features, t.in_features, torch.bfloat16)
            assert (key in lin.choices()) == (t.winner != "cublas")
        x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
        w = model.model.layers[0].self_attn.o_proj.weight
        assert rel_rms(lin.linear(x, w), gemv_reference(x.float(), w.float())) < KERNEL_REL_RMS
    finally:
        lin.reset_choices()
