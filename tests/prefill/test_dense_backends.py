"""The dense-attention kernel choice (``disagg.attention.dense_backends``) on CPU: buckets,
the forcing variable, the untuned default, and that CPU attention never consults it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from disagg.attention import dense_backends as db
from disagg.attention.dense import dense_attention


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(db.ENV_VAR, raising=False)
    db.reset_choices()
    yield
    db.reset_choices()


@pytest.mark.parametrize("n, expected", [(1, 256), (2, 256), (256, 256), (257, 512),
                                         (4095, 4096), (4096, 4096), (4097, 8192),
                                         (131071, 131072)])
def test_bucket_is_the_power_of_two_at_or_above_with_a_floor(n, expected):
    assert db.bucket(n) == expected


def test_short_prompts_share_the_smallest_buckets_choice():
    db._CHOICES[db.ShapeKey(db.MIN_TUNED_TOKENS, 32, 8, 128, torch.float32)] = "flash"
    for n in (2, 100, db.MIN_TUNED_TOKENS):
        assert db.kernel_for(torch.zeros(n, 32, 128), torch.zeros(n, 8, 128)) == "flash"
    n = db.MIN_TUNED_TOKENS + 1
    assert db.kernel_for(torch.zeros(n, 32, 128), torch.zeros(n, 8, 128)) == "cudnn"


def test_untuned_shapes_run_cudnn():
    q, k = torch.zeros(8192, 32, 128), torch.zeros(8192, 8, 128)
    assert db.kernel_for(q, k) == "cudnn"


def test_a_tuned_choice_applies_to_its_bucket_and_head_layout_only():
    q, k = torch.zeros(5000, 32, 128), torch.zeros(5000, 8, 128)
    db._CHOICES[db.ShapeKey(8192, 32, 8, 128, torch.float32)] = "fa4"
    assert db.kernel_for(q, k) == "fa4"
    assert db.kernel_for(q[:4000], k[:4000]) == "cudnn"  # bucket 4096
    assert db.kernel_for(q[:, :16], k) == "cudnn"  # other head count
    assert db.kernel_for(q.bfloat16(), k.bfloat16()) == "cudnn"  # other dtype


def test_the_variable_forces_a_kernel(monkeypatch):
    q, k = torch.zeros(5000, 32, 128), torch.zeros(5000, 8, 128)
    db._CHOICES[db.ShapeKey(8192, 32, 8, 128, torch.float32)] = "fa4"
    monkeypatch.setenv(db.ENV_VAR, "cudnn")
    assert db.kernel_for(q, k) == "cudnn"
    monkeypatch.setenv(db.ENV_VAR, "flash")
    assert db.kernel_for(q, k) == "flash"
    monkeypatch.setenv(db.ENV_VAR, "xformers")
    with pytest.raises(db.DenseBackendError, match="expected auto"):
        db.kernel_for(q, k)


def test_forcing_fa4_without_the_package_is_an_error(monkeypatch):
    monkeypatch.setattr(db, "fa4_available", lambda: False)
    monkeypatch.setenv(db.ENV_VAR, "fa4")
    with pytest.raises(db.DenseBackendError, match="does not import"):
        db.forced_kernel()


def _timing(steady: dict, first: dict, calls: int) -> db.Timing:
    return db.Timing(db.ShapeKey(32768, 32, 8, 128, torch.bfloat16), 32768, steady, first,
                     calls, winner="")


def test_a_prompt_pays_steady_time_per_layer_and_the_first_call_extra_once():
    t = _timing({"cudnn": 0.015, "fa4": 0.0136}, {"cudnn": 0.065, "fa4": 0.0137}, calls=16)
    assert t.cost("cudnn") == pytest.approx(16 * 0.015 + 0.050)
    assert t.cost("fa4") == pytest.approx(16 * 0.0136 + 0.0001)
    # a first call measured faster than the steady median is no saving
    assert _timing({"fa4": 0.02}, {"fa4": 0.01}, calls=2).cost("fa4") == pytest.approx(0.04)


def test_the_first_call_extra_can_outweigh_a_faster_steady_kernel():
    # an H200 at 8K tokens (one layer): cuDNN 0.95 ms steady, 48 ms on a new length; FA2 1.79
    steady, first = {"cudnn": 0.00095, "flash": 0.00179}, {"cudnn": 0.048, "flash": 0.00195}
    assert min(steady, key=_timing(steady, first, calls=16).cost) == "flash"
    assert min(steady, key=_timing(steady, first, calls=1000).cost) == "cudnn"


def test_a_timing_row_reports_both_times_in_milliseconds():
    row = replace(_timing({"cudnn": 0.015, "fa4": 0.0136}, {"cudnn": 0.065, "fa4": 0.0137},
                             calls=16), winner="fa4").as_row()
    assert row == {"bucket": 32768, "tokens": 32768, "calls": 16, "winner": "fa4",
                   "ms": {"cudnn": 15.0, "fa4": 13.6}, "first_ms": {"cudnn": 65.0, "fa4": 13.7}}


def test_tuning_on_cpu_measures_nothing():
    timings = db.tune_causal(torch.device("cpu"), num_heads=4, num_kv_heads=2, head_dim=16,
                             dtype=torch.float32, max_tokens=8192)
    assert timings == [] and db.choices() == {}


def test_cpu_causal_square_is_sdpa_whatever_is_chosen(monkeypatch):
    monkeypatch.setenv(db.ENV_VAR, "cudnn")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(64, 4, 16, generator=gen)
    k, v = torch.randn(64, 2, 16, generator=gen), torch.randn(64, 2, 16, generator=gen)
    kh, vh = (x.transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), kh, vh, is_causal=True)
    torch.testing.assert_close(dense_attention(q, k, v, q_start=0), ref.transpose(0, 1))


@pytest.mark.parametrize("sdpa", [db.sdpa_cudnn, db.sdpa_flash])
def test_an_sdpa_kernel_call_leaves_the_process_sdpa_state_as_it_was(sdpa):
    """Setting SDPA's priority order, even restored, slowed every later SDPA user on the H200;
    the cuDNN and FA2 calls only toggle enabled flags, restored exactly (on CPU cuDNN falls
    back, FA2 runs torch's CPU flash kernel)."""
    order = torch._C._get_sdp_priority_order()
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled())
    gen = torch.Generator().manual_seed(1)
    qh, kh, vh = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    out = sdpa(qh, kh, vh, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qh, kh, vh, is_causal=True))
    assert torch._C._get_sdp_priority_order() == order
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled()) == flags
