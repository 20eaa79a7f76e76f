"""The fused elementwise ops: Triton kernels under TRITON_INTERPRET=1 against their PyTorch
references (fp32: the interpreter's bf16 is not the GPU's), and the references against the
unfused formulas the model used before (fp32, exact to rounding).

Awkward shapes: hidden sizes that are not powers of two (576 = SmolLM2's), head counts 9/3,
odd token counts. Out-of-place outputs are NaN-poisoned first so an unwritten row fails.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from disagg_kernels.fused import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)

FP32_ATOL = 1e-5
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests (no CUDA here)")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unfused_rope(x, cos, sin):
    """The model's former RoPE: cos/sin duplicated to head_dim, rotate-half by ``cat``."""
    half = x.shape[-1] // 2
    cos2, sin2 = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]
    return x * cos2 + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin2


def _cos_sin(num_tokens, half, seed=1):
    angles = torch.arange(num_tokens).float()[:, None] * torch.rand(
        half, generator=torch.Generator().manual_seed(seed))[None, :]
    return angles.cos(), angles.sin()


def test_references_equal_the_unfused_formulas():
    x, res, w = _randn(7, 576), _randn(7, 576, seed=1), _randn(576, seed=2)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(rms_norm_reference(x, w, 1e-5), ref, atol=FP32_ATOL)
    expected_res = res + x
    normed, out_res = add_rms_norm_reference(x, res, w, 1e-5)
    assert out_res is res and torch.equal(res, expected_res)
    assert torch.equal(normed, rms_norm_reference(expected_res, w, 1e-5))
    q = _randn(5, 9, 64, seed=3)
    cos, sin = _cos_sin(5, 32)
    expected = _unfused_rope(q, cos, sin)
    assert rope_reference(q, cos, sin) is q
    assert torch.allclose(q, expected, atol=FP32_ATOL)
    g, u = _randn(3, 160, seed=4), _randn(3, 160, seed=5)
    assert torch.equal(silu_mul_reference(g, u), F.silu(g) * u)


@interpreter
@pytest.mark.parametrize("num_rows, hidden", [(1, 64), (7, 576), (33, 256)])
def test_rms_norm_kernel(num_rows, hidden):
    from disagg_kernels.fused.launcher import rms_norm_triton

    x, w = _randn(num_rows, hidden), _randn(hidden, seed=2)
    out = torch.full_like(x, float("nan"))
    rms_norm_triton(x, w, 1e-6, out=out)
    assert torch.allclose(out, rms_norm_reference(x, w, 1e-6), atol=FP32_ATOL)


@interpreter
@pytest.mark.parametrize("num_rows, hidden", [(1, 64), (7, 576)])
def test_add_rms_norm_kernel_updates_the_residual_in_place(num_rows, hidden):
    from disagg_kernels.fused.launcher import rms_norm_triton

    x, w = _randn(num_rows, hidden), _randn(hidden, seed=2)
    res = _randn(num_rows, hidden, seed=1)
    ref_res = res.clone()
    ref_out, _ = add_rms_norm_reference(x, ref_res, w, 1e-5)
    out = torch.full_like(x, float("nan"))
    rms_norm_triton(x, w, 1e-5, residual=res, out=out)
    assert torch.allclose(res, ref_res, atol=FP32_ATOL)
    assert torch.allclose(out, ref_out, atol=FP32_ATOL)


@interpreter
def test_rms_norm_kernel_reads_a_row_stride():
    from disagg_kernels.fused.launcher import rms_norm_triton

    wide, w = _randn(6, 128), _randn(96, seed=2)
    x = wide[:, :96]  # row stride 128, contiguous last dim
    assert torch.allclose(rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5),
                          atol=FP32_ATOL)


@interpreter
@pytest.mark.parametrize("num_tokens, heads, head_dim", [(1, 4, 32), (13, 9, 64), (6, 3, 128)])
def test_rope_kernel(num_tokens, heads, head_dim):
    from disagg_kernels.fused.launcher import rope_triton

    x = _randn(num_tokens, heads, head_dim)
    cos, sin = _cos_sin(num_tokens, head_dim // 2)
    expected = _unfused_rope(x, cos, sin)
    assert rope_triton(x, cos, sin) is x
    assert torch.allclose(x, expected, atol=FP32_ATOL)


@interpreter
def test_rope_kernel_on_a_view_with_head_strides():
    from disagg_kernels.fused.launcher import rope_triton

    qkv = _randn(5, 6, 32)
    k = qkv[:, 4:]  # the last 2 heads of a fused projection: token stride 6 * 32
    untouched = qkv[:, :4].clone()
    cos, sin = _cos_sin(5, 16)
    expected = _unfused_rope(k.clone(), cos, sin)
    rope_triton(k, cos, sin)
    assert torch.allclose(k, expected, atol=FP32_ATOL)
    assert torch.equal(qkv[:, :4], untouched)


@interpreter
@pytest.mark.parametrize("shape", [(1, 160), (3, 1000), (2, 2500)])
def test_silu_mul_kernel(shape):
    from disagg_kernels.fused.launcher import silu_mul_triton

    g, u = _randn(*shape), _randn(*shape, seed=1)
    expected = F.silu(g) * u
    out = torch.full_like(g, float("nan"))
    silu_mul_triton(g, u, out=out)
    assert torch.allclose(out, expected, atol=FP32_ATOL)
    assert silu_mul_triton(g, u, out=g) is g  # in place over the gate
    assert torch.allclose(g, expected, atol=FP32_ATOL)


@interpreter
def test_silu_mul_kernel_on_the_halves_of_a_packed_product():
    from disagg_kernels.fused.launcher import silu_mul_triton

    gate_up = _randn(3, 2 * 1100)  # a fused gate/up projection: row stride 2I
    gate, up = gate_up.chunk(2, dim=-1)
    expected, up_before = F.silu(gate) * up, up.clone()
    assert silu_mul_triton(gate, up, out=gate) is gate
    assert torch.allclose(gate, expected, atol=FP32_ATOL)
    assert torch.equal(up, up_before)  # the up half is read, never written


@interpreter
def test_launchers_reject_bad_layouts():
    from disagg_kernels.fused.launcher import rms_norm_triton, rope_triton, silu_mul_triton

    with pytest.raises(ValueError):
        rms_norm_triton(_randn(4, 64), _randn(32), 1e-5)
    with pytest.raises(ValueError):
        rope_triton(_randn(4, 2, 32), *(t.double() for t in _cos_sin(4, 16)))
    with pytest.raises(ValueError):
        silu_mul_triton(_randn(4, 64).t(), _randn(64, 4))
    with pytest.raises(ValueError):
        silu_mul_triton(_randn(5000), _randn(5000))  # rows [T, C] only
