"""Fidelity machinery on CPU: teacher-forced scoring equals a sparse prefill followed by dense
decode over its KV, batching changes nothing, and the synthetic tasks land on their lengths."""

from __future__ import annotations

import json

import pytest
import torch
from disagg_kernels.dynamic_sparse import DynamicSparseParams
from disagg_kernels.triangle_mix import TriangleParams
from helpers import embedded_model_dir, random_model

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.attention.dense import dense_attention
from disagg.attention.prefill import PrefillAttention
from disagg.attention.triangle import TriangleMixConfig
from disagg.fidelity.scoring import _batched_causal, score_configs, score_continuations
from disagg.fidelity.tasks import ANSWER_BUDGET_TOKENS, TASKS, generate_task
from disagg.kv.layout import KVLayout, PackedKV

N, A = 80, 5
SMALL = TriangleParams(n_sink=2, n_window=16, n_last=8)
CONFIGS = {
    "dense": None,
    "trianglemix": TriangleMixConfig((1, 3), SMALL),
    "trianglemix+dynamic": TriangleMixConfig(
        (1, 3), SMALL, dynamic=DynamicSparseParams(block_size=16, last_queries=16,
                                                   threshold=0.5, min_tokens=32)),
}


@pytest.fixture(scope="module")
def tiny():
    model, _ = random_model("tiny-llama")
    return model


def _ids(seed, n, vocab=512):
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _prefill_then_decode(model, prompt, continuation, config):
    """Serving's path: prefill (config) into a cache, then one dense decode step per token
    (fed ``continuation``, or its own argmax when None); returns the logits that predicted
    each token ``[A, V]`` and the tokens fed."""
    n = prompt.shape[0]
    layout = KVLayout.of_model(model)
    kv = PackedKV.empty(layout, n, "cpu")
    hidden = model(prompt, torch.arange(n), PrefillAttention(kv, n, model.scale, config))
    logits = [model.compute_logits(hidden[-1:])[0]]
    cache = ContiguousKVCache.allocate(num_layers=layout.num_layers, max_tokens=n + A,
                                       num_kv_heads=layout.num_kv_heads,
                                       head_dim=layout.head_dim, dtype=torch.float32,
                                       device="cpu")
    for layer in range(layout.num_layers):
        cache.k[layer][:n], cache.v[layer][:n] = kv.k[layer], kv.v[layer]
    fed = []
    for t in range(A):
        fed.append(int(logits[-1].argmax()) if continuation is None else int(continuation[t]))
        if t == A - 1:
            break
        pos = torch.tensor([n + t])
        h = model(torch.tensor([fed[-1]]), pos, ContiguousAttention(cache, n + t, model.scale))
        logits.append(model.compute_logits(h)[0])
    return torch.stack(logits), fed


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_scoring_equals_prefill_then_dense_decode(tiny, name):
    config = CONFIGS[name]
    prompt, cont = _ids(1, N), _ids(2, A)
    ref, _ = _prefill_then_decode(tiny, prompt, cont, config)
    ref_nll = float(-torch.log_softmax(ref, -1).gather(-1, cont[:, None]).sum())
    scores = score_continuations(tiny, prompt[None], [cont.tolist()], config)
    assert scores.nll[0] == pytest.approx(ref_nll, rel=1e-4)
    assert scores.exact == [False]  # random tokens are not what the model would say
    # Greedy decoding's own output, scored teacher-forced, is exact; one token changed is not.
    _, greedy = _prefill_then_decode(tiny, prompt, None, config)
    assert score_continuations(tiny, prompt[None], [greedy], config).exact == [True]
    wrong = greedy[:2] + [(greedy[2] + 1) % 512] + greedy[3:]
    assert score_continuations(tiny, prompt[None], [wrong], config).exact == [False]


def test_sparse_configs_really_differ_from_dense(tiny):
    prompt, cont = _ids(3, N), _ids(4, A)
    nll = {k: score_continuations(tiny, prompt[None], [cont.tolist()], c).nll[0]
           for k, c in CONFIGS.items()}
    assert nll["trianglemix"] != nll["dense"]
    assert nll["trianglemix+dynamic"] != nll["trianglemix"]


def test_batched_equals_one_at_a_time(tiny):
    prompts = torch.stack([_ids(5, N), _ids(6, N), _ids(7, N)])
    conts = [_ids(8, 3).tolist(), _ids(9, A).tolist(), _ids(10, 1).tolist()]
    config = CONFIGS["trianglemix"]
    batch = score_continuations(tiny, prompts, conts, config)
    for i in range(3):
        one = score_continuations(tiny, prompts[i:i + 1], conts[i:i + 1], config)
        assert one.exact == batch.exact[i:i + 1]
        assert one.nll[0] == pytest.approx(batch.nll[i], rel=1e-5)
    assert batch.num_tokens == [3, A, 1]


def test_shared_dense_prefix_equals_separate_runs(tiny):
    """score_configs computes the layers before each configuration's first Triangle layer once;
    every configuration's scores are exactly those of its own forward."""
    prompts = torch.stack([_ids(11, N), _ids(12, N)])
    conts = [_ids(13, A).tolist(), _ids(14, 2).tolist()]
    configs = {**CONFIGS, "late": TriangleMixConfig((2, 3), SMALL),
               "first": TriangleMixConfig((0, 2), SMALL)}
    together = score_configs(tiny, prompts, conts, configs)
    assert set(together) == set(configs)
    for name, config in configs.items():
        alone = score_continuations(tiny, prompts, conts, config)
        assert together[name] == alone, name
    assert len({tuple(s.nll) for s in together.values()}) == len(configs)


def test_batched_causal_equals_per_sequence():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3 * 20, h, 8, generator=g) for h in (4, 2, 2))
    batched = _batched_causal(q, k, v, 3, 0.3)
    for b in range(3):
        rows = slice(b * 20, (b + 1) * 20)
        torch.testing.assert_close(batched[rows], dense_attention(q[rows], k[rows], v[rows],
                                                                  q_start=0, scale=0.3))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.mark.parametrize("task", TASKS)
def test_tasks_hit_their_length_and_are_deterministic(tokenizer, task):
    a = generate_task(tokenizer, task, 1024, 3, seed=0)
    b = generate_task(tokenizer, task, 1024, 3, seed=0)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert len({tuple(s.prompt_ids) for s in a}) == 3
    for s in a:
        assert len(s.prompt_ids) == 1024 - ANSWER_BUDGET_TOKENS
        assert len(s.prompt_ids) + len(s.answer_ids) <= 1024
        assert tokenizer.decode(s.answer_ids) == s.answer_text
        text = tokenizer.decode(s.prompt_ids)
        # Pieces were tokenized apart; together they are the text's own tokenization.
        assert tokenizer.encode(text, add_special_tokens=False) == s.prompt_ids
        key = s.answer_text.strip()
        if task != "variable_tracking":
            assert key in text  # the answer is in the context


def test_dynamic_sparsity_is_opt_in_and_composes_per_layer():
    plain = TriangleMixConfig((1, 3), SMALL)
    assert plain.dynamic is None and "dynamic" not in plain.tag
    assert [plain.kind(i, 4096).value for i in range(4)] == ["dense", "triangle", "dense",
                                                             "triangle"]
    mixed = CONFIGS["trianglemix+dynamic"]
    assert [mixed.kind(i, 64).value for i in range(4)] == ["dynamic", "triangle", "dynamic",
                                                           "triangle"]
    assert mixed.kind(0, 31).value == "dense"  # below min_tokens the dense layers stay dense
    assert "dynamic(block=16,vertical_slash=16,threshold=0.5)" in mixed.tag


def _row(task, length, layers, dense, tm, metric="accuracy"):
    return {"task": task, "metric": metric, "context_tokens": length, "layers": layers,
            "n_samples": 300, "dense_score": dense, "trianglemix_score": tm,
            "delta": tm - dense, "delta_ci95": [tm - dense - 1, tm - dense + 1],
            "source": "engine"}


def test_summary_judges_at_the_longest_length_where_dense_scores_above_20(tmp_path):
    from benchmarks.fidelity import plot, summarize

    rows = [_row("niah_single", 8192, "probed", 90.0, 89.5),
            _row("niah_single", 8192, "deep_half", 90.0, 88.0),
            _row("kv_retrieval", 2048, "probed", 30.0, 30.0),
            _row("kv_retrieval", 2048, "deep_half", 30.0, 31.0),
            _row("kv_retrieval", 8192, "probed", 10.0, 0.0),
            _row("kv_retrieval", 8192, "deep_half", 10.0, 0.0),
            _row("niah_multikey", 2048, "probed", 20.0, 20.0),
            _row("niah_multikey", 2048, "deep_half", 20.0, 20.0),
            _row("nll_python_stdlib", 8192, "probed", 1.3, 1.31, metric="nll"),
            # a served check at a longer length: never the judged cell
            {**_row("niah_single", 16384, "deep_half", 90.0, 90.0), "source": "served"}]
    summary = summarize(rows)["tasks"]
    assert summary["niah_single"]["judged_length"] == 8192
    assert summary["niah_single"]["probed"]["within_target"] is True
    assert summary["niah_single"]["deep_half"]["within_target"] is False
    assert summary["kv_retrieval"]["judged_length"] == 2048  # dense <= 20% at 8K
    assert summary["niah_multikey"] == {"judged_length": None}  # 20% is not above 20%
    assert "nll_python_stdlib" not in summary
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps({"device": "cpu", "commit": "abc1234", "rows": rows}))
    assert plot(path).stat().st_size > 0


def test_served_rows_merge_into_the_results_file_under_the_default_set(tmp_path):
    from benchmarks.fidelity_served import merge

    served = tmp_path / "fidelity_served.json"
    fidelity = tmp_path / "fidelity.json"
    served.write_text(json.dumps({"device": "cpu", "commit": "abc", "rows": [
        {**_row("niah_single", 2048, "default", 100.0, 100.0), "source": "served"},
        {**_row("niah_single", 2048, "default", 100.0, 100.0), "source": "engine"}]}))
    fidelity.write_text(json.dumps({"default_layers": "deep_half", "rows": [
        _row("niah_single", 8192, "deep_half", 90.0, 89.0),
        {**_row("niah_single", 2048, "deep_half", 1.0, 1.0), "source": "served"}]}))
    assert merge(served, fidelity) == 1
    rows = json.loads(fidelity.read_text())["rows"]
    assert [(r["source"], r["layers"], r["dense_score"]) for r in rows] == [
        ("engine", "deep_half", 90.0), ("served", "deep_half", 100.0)]
    assert rows[-1]["device"] == "cpu" and rows[-1]["commit"] == "abc"
