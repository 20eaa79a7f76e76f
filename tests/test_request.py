"""EngineRequest.create: the prompt check every entry point shares, on lists and buffers."""

from array import array

import pytest

from disagg.errors import InvalidRequestError
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
