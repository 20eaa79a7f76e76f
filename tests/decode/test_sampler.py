"""The batched device sampler picks exactly ``sample()``'s tokens and log-probabilities.

Runs on CPU tensors here (the GPU run repeats the check on CUDA in test_decode_graphs_gpu.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from disagg.decode.sampler import RowRequest, Sampler, _signed64, argmax_rows, keyed_uniform_tensor
from disagg.sampling import SamplingParams, keyed_uniform, sample

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.5, top_k=40, logprobs=3),
    SamplingParams(temperature=0.0, logprobs=0),
    SamplingParams(temperature=2.0, top_p=0.999, logprobs=5),
    SamplingParams(temperature=1.0, top_k=100000),  # top_k above the vocabulary
]


def test_keyed_uniform_tensor_equals_keyed_uniform():
    rng = random.Random(0)
    seeds = [rng.getrandbits(63) for _ in range(200)] + [0, 1, -5, 2**63, 2**64 - 1]
    steps = [rng.randrange(10**7) for _ in seeds]
    got = keyed_uniform_tensor(torch.tensor([_signed64(s) for s in seeds]), torch.tensor(steps))
    want = torch.tensor([keyed_uniform(s, k) for s, k in zip(seeds, steps)], dtype=torch.float64)
    assert torch.equal(got, want)


@pytest.mark.parametrize("vocab", [50, 4096])
def test_batch_tokens_equal_sample_per_row(vocab):
    g = torch.Generator().manual_seed(vocab)
    sampler = Sampler(64, torch.device("cpu"))
    rng = random.Random(vocab)
    for trial in range(6):
        rows = [RowRequest(rng.choice(PARAMS), rng.getrandbits(63), rng.randrange(1000))
                for _ in range(rng.randrange(1, 24))]
        # Peaked and flat rows: the nucleus then holds few tokens or many.
        logits = torch.randn(len(rows), vocab, generator=g) * (1 + 4 * (trial % 2))
        got = sampler.sample(logits, rows)
        want = [sample(logits[b], r.params, r.seed, r.step) for b, r in enumerate(rows)]
        assert got == want


def test_sampled_tokens_cover_the_distribution():
    # A draw per step, not one fixed token: the keyed draw really moves through the cdf.
    sampler = Sampler(8, torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    tokens = [sampler.sample(logits, [RowRequest(SamplingParams(), 11, s)])[0].token_id
              for s in range(300)]
    counts = torch.bincount(torch.tensor(tokens), minlength=3) / 300
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.08)


@pytest.mark.parametrize("vocab", [128256, 49152, 50257, 1000])
def test_two_stage_argmax_equals_torch_argmax(vocab):
    """First maximum on ties, NaN as the maximum, all -inf rows: as ``torch.argmax``."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=g)
    x[0, 5] = x[0, vocab - 3] = x[0].max() + 1  # a tie across chunks: the first wins
    x[1] = float("-inf")
    x[2, 7] = x[2, vocab - 1] = float("nan")
    x[3, vocab - 1] = 100.0  # in the last chunk
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
