"""The TriangleMix layer probe on a tiny random model (CPU): it runs, its scores are
deterministic for a seed and shaped per layer, the gates really reach the gradient, and the
CLI prints the recommendation."""

from __future__ import annotations

import json

import pytest
import torch
from disagg_kernels.triangle_mix import TriangleParams

from disagg.cli import main
from disagg.fidelity.probe import build_probe_model, probe_layers, token_kv_prompts
from disagg.models.loader import ModelSource

SMALL = TriangleParams(n_sink=2, n_window=16, n_last=8)


@pytest.fixture(scope="module")
def tiny():
    source = ModelSource(name="random:tiny-llama", random_config="tiny-llama", seed=0)
    return build_probe_model(source, "cpu")


def _run(model, seed):
    prompts = token_kv_prompts(model.config.vocab_size, 96, 3, seed)
    return probe_layers(model, prompts, SMALL, model_name="random:tiny-llama")


def test_scores_are_per_layer_and_deterministic(tiny):
    a, b = _run(tiny, 0), _run(tiny, 0)
    assert len(a.scores) == len(a.signed) == tiny.config.num_hidden_layers
    assert a.scores == b.scores and a.signed == b.signed
    # The middle rows of a layer reach the first token only through later layers' K/V: every
    # layer but the last has a nonzero score, the last exactly zero.
    assert all(s > 0 for s in a.scores[:-1]) and a.scores[-1] == 0.0
    assert _run(tiny, 1).scores != a.scores
    assert a.num_prompts == 3 and a.prompt_tokens == 96


def test_recommendation_takes_the_lowest_scores(tiny):
    result = _run(tiny, 0)
    chosen = result.recommend(2)
    rest = [s for i, s in enumerate(result.scores) if i not in chosen]
    assert len(chosen) == 2 and max(result.scores[i] for i in chosen) <= min(rest)
    with pytest.raises(ValueError):
        result.recommend(0)


def test_gates_of_one_leave_the_model_unchanged(tiny):
    """With every gate at 1 the probe's attention is dense causal attention: the logits equal
    transformers' own SDPA implementation of the same weights."""
    ids = torch.tensor([token_kv_prompts(tiny.config.vocab_size, 40, 1, 0)[0][0]])
    from disagg.fidelity.probe import _ProbeState

    state = _ProbeState(torch.ones(tiny.config.num_hidden_layers), torch.zeros(40, 40).bool())
    ours = tiny(input_ids=ids, probe=state, use_cache=False).logits
    tiny.config._attn_implementation = "sdpa"
    try:
        ref = tiny(input_ids=ids, use_cache=False).logits
    finally:
        tiny.config._attn_implementation = "disagg_probe"
    assert torch.allclose(ours, ref, atol=1e-5)


def test_cli_prints_the_recommendation(capsys):
    assert main(["probe-layers", "--model", "random:tiny-llama", "--num-prompts", "2",
                 "--prompt-tokens", "700", "--num-triangle-layers", "2", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["scores"]) == 4 and len(out["recommended"]) == 2
    assert out["params"] == {"n_sink": 8, "n_window": 512, "n_last": 128}
