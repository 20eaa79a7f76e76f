"""EngineRequest.create: the prompt check every entry point shares, on lists and buffers; and
EngineRequest.random_prefill, the random prompt of warm-ups and benchmarks."""

from array import array

import pytest
import torch

from disagg.errors import ContextLengthError, InvalidRequestError
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams


def create(ids):
    return EngineRequest.create("r", ids, SamplingParams(max_tokens=1), vocab_size=100,
                                context=1 << 20)


@pytest.mark.parametrize("ids, bad", [([1, 100, 2], 100), ([5, -1], -1), ([1 << 70, 3], 1 << 70),
                                      (array("q", [3, 99, 100]), 100)])
def test_the_first_id_outside_the_vocabulary_is_named(ids, bad):
    with pytest.raises(InvalidRequestError) as info:
        create(ids)
    assert f"token id {bad} is outside" in str(info.value) and info.value.param == "prompt"


@pytest.mark.parametrize("ids", [[], array("q")])
def test_an_empty_prompt_is_refused(ids):
    with pytest.raises(InvalidRequestError, match="empty"):
        create(ids)


@pytest.mark.parametrize("ids", [[0, 99, 7], (0, 99, 7), array("q", [0, 99, 7])])
def test_valid_ids_become_one_int64_buffer(ids):
    request = create(ids)
    assert isinstance(request.prompt_token_ids, array)
    assert request.prompt_token_ids.typecode == "q" and list(request.prompt_token_ids) == [0, 99, 7]
    assert request.prompt_tensor().tolist() == [0, 99, 7]


def test_random_prefill_is_a_greedy_one_token_request_of_seeded_ids():
    a = EngineRequest.random_prefill("a", 300, vocab_size=50, context=400, seed=3)
    assert a.num_prompt_tokens == 300 and a.max_tokens == 1 and a.params.temperature == 0.0
    assert all(0 <= t < 50 for t in a.prompt_token_ids) and len(set(a.prompt_token_ids)) > 10
    assert a.prompt_token_ids == EngineRequest.random_prefill(
        "b", 300, vocab_size=50, context=400, seed=3).prompt_token_ids  # the same seed
    g = torch.Generator().manual_seed(3)
    first = EngineRequest.random_prefill("c", 300, vocab_size=50, context=400, generator=g)
    second = EngineRequest.random_prefill("d", 300, vocab_size=50, context=400, generator=g)
    assert first.prompt_token_ids == a.prompt_token_ids  # a generator in its seed's state
    assert second.prompt_token_ids != first.prompt_token_ids  # and drawn on from there
    with pytest.raises(ContextLengthError):
        EngineRequest.random_prefill("e", 400, vocab_size=50, context=400)
