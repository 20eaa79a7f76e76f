"""Packed q/k/v and gate/up projections (``LlamaForCausalLM.fuse_projections``): the same
numbers as the separate products, the Hugging Face parameter names kept, and a stale pack
never used."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.models.llama import LlamaForCausalLM


def _forward(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states and layer 0's K of a prefill of ``ids``."""
    c = model.config
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache.allocate(num_layers=c.num_layers, max_tokens=len(ids),
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       dtype=dtype, device="cpu")
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), ContiguousAttention(cache, 0, model.scale))
    return hidden, cache.k[0].clone()


def _unpacked_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    ref = LlamaForCausalLM(model.config)
    ref.load_state_dict(model.state_dict())
    return ref.eval().requires_grad_(False)


def _packs(model: LlamaForCausalLM):
    return [p for layer in model.model.layers for p in (layer.self_attn._qkv, layer.mlp._gate_up)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])  # qwen2: q/k/v biases
def test_packed_model_matches_separate_products(name):
    model, _ = random_model(name)
    assert all(p is not None and p.is_current() for p in _packs(model))  # load_model packs
    ref = _unpacked_copy(model)
    assert all(p is None for p in _packs(ref))
    ids = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    (hidden, k0), (ref_hidden, ref_k0) = _forward(model, ids), _forward(ref, ids)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k0, ref_k0, rtol=1e-5, atol=1e-5)
    assert hidden.abs().max() > 0.1  # not a degenerate comparison


def test_parameters_are_views_of_the_pack_and_keep_their_names():
    model, _ = random_model("tiny-llama")
    attn = model.model.layers[0].self_attn
    pack = attn._qkv.weight
    q_rows = attn.q_proj.weight.shape[0]
    assert attn.q_proj.weight.data_ptr() == pack.data_ptr()
    assert torch.equal(pack[q_rows:q_rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    names = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= names
    assert not any("qkv" in n or "gate_up" in n for n in names)
    # Loading a checkpoint into the packed model writes through to the pack.
    other, _ = random_model("tiny-llama", seed=1)
    model.load_state_dict(other.state_dict())
    assert attn._qkv.is_current()
    assert torch.equal(attn._qkv.weight[:q_rows], other.model.layers[0].self_attn.q_proj.weight)
    ids = torch.arange(20) % model.config.vocab_size
    torch.testing.assert_close(_forward(model, ids)[0], _forward(other, ids)[0])


def test_a_moved_or_cast_model_never_uses_a_stale_pack():
    model, _ = random_model("tiny-llama")
    ids = torch.arange(25) % model.config.vocab_size
    expected = _forward(model, ids)[0].double()
    model.to(torch.float64)  # every parameter gets storage of its own
    assert not any(p.is_current() for p in _packs(model))
    with torch.no_grad():  # a stale pack would ignore this change; the model must not
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    changed = _forward(model, ids)[0]
    assert not torch.allclose(changed, expected, atol=1e-3)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    torch.testing.assert_close(_forward(model, ids)[0], expected, rtol=1e-5, atol=1e-5)
    model.fuse_projections()
    assert all(p.is_current() for p in _packs(model))
    assert model.model.layers[0].self_attn._qkv.weight.dtype == torch.float64
    torch.testing.assert_close(_forward(model, ids)[0], expected, rtol=1e-5, atol=1e-5)
