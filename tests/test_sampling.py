"""Keyed sampling and incremental detokenization."""

from __future__ import annotations

import pytest
import torch
from helpers import embedded_model_dir
from transformers import AutoTokenizer

from disagg.detokenize import IncrementalDetokenizer
from disagg.errors import InvalidRequestError
from disagg.sampling import SamplingParams, keyed_uniform, sample_token


def test_draws_depend_on_seed_and_step_only():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
    a = [sample_token(logits, params, seed=7, step=s) for s in range(20)]
    # Interleaving draws of another request changes nothing.
    b = []
    for s in range(20):
        sample_token(logits, params, seed=8, step=s)
        b.append(sample_token(logits, params, seed=7, step=s))
    assert a == b
    assert a != [sample_token(logits, params, seed=9, step=s) for s in range(20)]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), 1, s) for s in range(200)}
    assert draws == {0, 1}
    # p(0) ~ 0.66: top_p=0.5 keeps only the first token.
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), 1, s) for s in range(50)}
    assert draws == {0}
    assert sample_token(logits, SamplingParams(temperature=0.0), 1, 0) == 0


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    counts = torch.bincount(torch.tensor(
        [sample_token(logits, SamplingParams(temperature=1.0), 123, s) for s in range(4000)]))
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    assert 0.0 <= keyed_uniform(2**62, 10**6) < 1.0


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"stop": ("",)},
])
def test_bad_sampling_params_raise_typed_errors(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_detokenizer_never_emits_incomplete_utf8():
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    text = "Grüße, 你好世界 🎉🚀 naïve café"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters really are split over tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
