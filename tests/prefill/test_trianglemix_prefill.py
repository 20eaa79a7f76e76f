"""TriangleMix in the prefill path: per-layer kinds, equality with the explicit mask, and the
whole model (token 0, KV) against the colocated generator."""

from __future__ import annotations

import pytest
import torch
from disagg_kernels.triangle_mix import TriangleParams, masked_attention_reference, triangle_mask
from helpers import random_model

from disagg.attention.metadata import AttentionKind
from disagg.attention.prefill import PrefillAttention
from disagg.attention.triangle import (
    TriangleMixConfig,
    attention_tag,
    published_trianglemix,
)
from disagg.generate import SimpleGenerator
from disagg.kv.layout import KVLayout, PackedKV
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("n, params", [(45, SMALL), (130, SMALL), (300, SMALL), (53, SMALL),
                                       (700, TriangleParams())])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)])
def test_triangle_layer_equals_attention_under_the_explicit_mask(n, params, heads):
    hq, hkv = heads
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, h, 32, generator=g) for h in (hq, hkv, hkv))
    config = TriangleMixConfig((0,), params)
    layout = KVLayout(num_layers=1, num_kv_heads=hkv, head_dim=32, dtype=torch.float32)
    meta = PrefillAttention(PackedKV.empty(layout, n, "cpu"), n, 32**-0.5, config)
    sparse = n > config.min_sparse_tokens
    assert meta.kind(0) is (AttentionKind.TRIANGLE if sparse else AttentionKind.DENSE)
    out = meta.attend(0, q, k, v)
    ref, _ = masked_attention_reference(q, k, v, triangle_mask(n, 0, n, 0, n, params))
    assert rel_rms(out, ref) < 1e-5
    dense_ref, _ = masked_attention_reference(q, k, v, torch.ones(n, n, dtype=torch.bool).tril())
    if sparse:
        assert rel_rms(out, dense_ref) > 1e-3  # the middle really is skipped
    else:  # short prompts: the mask keeps everything, and the dense path runs
        assert rel_rms(out, dense_ref) < 1e-5
    assert torch.equal(meta.sink.k[0], k) and torch.equal(meta.sink.v[0], v)


def test_short_prompts_and_shallow_layers_are_dense():
    config = TriangleMixConfig((2, 3), SMALL)
    threshold = SMALL.n_sink + SMALL.n_window + SMALL.n_last
    assert config.kind(3, threshold) is AttentionKind.DENSE
    assert config.kind(3, threshold + 1) is AttentionKind.TRIANGLE
    assert config.kind(1, 10_000) is AttentionKind.DENSE


def test_published_splits_and_tags():
    assert published_trianglemix("random:llama-3.1-8b").triangle_layers == tuple(range(16, 32))
    assert published_trianglemix("qwen2.5-7b").triangle_layers == tuple(range(20, 28))
    assert published_trianglemix("smollm2-135m-instruct").triangle_layers == tuple(range(15, 30))
    assert attention_tag(None) == "dense"
    assert published_trianglemix("llama-3.1-8b").tag == \
        "trianglemix(sink=8,window=512,last=128,layers=16-31)"
    with pytest.raises(ValueError, match="no TriangleMix split"):
        published_trianglemix("tiny-llama")
    with pytest.raises(ValueError, match="does not exist"):
        TriangleMixConfig((40,)).validate_for(30)


@pytest.mark.parametrize("trianglemix", [None, TriangleMixConfig((2, 3), SMALL)])
def test_prefill_engine_matches_the_colocated_generator(trianglemix):
    model, _ = random_model("tiny-llama", seed=5)
    prompt = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=3)
    request = EngineRequest.create("r", prompt, params, vocab_size=512, context=4096)
    engine = PrefillEngine(model, model_name="tiny", trianglemix=trianglemix)
    result = engine.prefill(request)
    generator = SimpleGenerator(model, trianglemix=trianglemix)
    assert result.first_token.token_id == next(generator.generate(prompt, params))
    assert result.first_token.logprob is not None and len(result.first_token.top_logprobs) == 3
    assert result.fingerprint.attention == attention_tag(trianglemix)
    assert result.fingerprint.num_prompt_tokens == 150
    assert result.kv.num_tokens == 150 and len(result.kv.k) == model.config.num_layers


def test_trianglemix_changes_only_the_deep_layers_kv():
    model, _ = random_model("tiny-llama", seed=5)
    prompt = list(range(3, 203))
    request = EngineRequest.create("r", prompt, SamplingParams(temperature=0.0), vocab_size=512,
                                   context=4096)
    dense = PrefillEngine(model, model_name="tiny").prefill(request).kv
    mixed = PrefillEngine(model, model_name="tiny",
                          trianglemix=TriangleMixConfig((2, 3), SMALL)).prefill(request).kv
    # Layers 0-2 see only dense layers below them; layer 3's input went through a Triangle layer.
    for layer in (0, 1, 2):
        assert torch.equal(dense.k[layer], mixed.k[layer])
    assert not torch.allclose(dense.k[3], mixed.k[3])
