"""Our model equals transformers (DESIGN.md §7): logits within 1e-4 of max |logit|, greedy ids
identical up to the reference's first near-tie."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    embedded_model_dir,
    greedy_prefix_length,
    random_model,
    rel_err_max,
    save_as_hf_dir,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.generate import SimpleGenerator
from disagg.models.embedded import find_gguf
from disagg.models.loader import ModelSource, load_model
from disagg.sampling import SamplingParams

LOGIT_TOL = 1e-4


def all_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every prompt position through our model (one prefill forward)."""
    c = model.config
    cache = ContiguousKVCache.allocate(
        num_layers=c.num_layers, max_tokens=len(ids), num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=torch.float32, device="cpu",
    )
    tokens = torch.tensor(ids)
    with torch.inference_mode():
        hidden = model(tokens, torch.arange(len(ids)), ContiguousAttention(cache, 0, model.scale))
        return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers reading the GGUF itself (dequantized to fp32)."""
    gguf = find_gguf()
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smollm2():
    path = embedded_model_dir()
    return load_model(ModelSource(name="smollm2", path=path)), AutoTokenizer.from_pretrained(path)


def test_smollm2_logits_equal_transformers_reading_the_gguf(smollm2, hf_gguf_model):
    model, tokenizer = smollm2
    ids = tokenizer("Gravity is the force by which a planet or other body draws objects toward "
                    "its centre. It keeps the Moon in orbit around the Earth.")["input_ids"]
    ours = all_logits(model, ids)
    with torch.inference_mode():
        ref = hf_gguf_model(torch.tensor([ids])).logits[0].float()
    assert rel_err_max(ours, ref) < LOGIT_TOL
    assert rel_err_max(ours[-1], ref[-1]) < LOGIT_TOL


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_random_config_logits_equal_transformers(name, tmp_path):
    model, source = random_model(name, seed=3)
    hf_dir = save_as_hf_dir(model, source.hf_config(), tmp_path / name)
    reloaded = load_model(ModelSource(name=name, path=hf_dir))
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (77,), generator=torch.Generator().manual_seed(1))
    ours = all_logits(model, ids.tolist())
    with torch.inference_mode():
        ref = ref_model(ids[None]).logits[0]
    assert rel_err_max(ours, ref) < LOGIT_TOL
    # Loading the saved directory gives exactly the random model back.
    assert torch.equal(all_logits(reloaded, ids.tolist()), ours)


@pytest.mark.parametrize("prompt", [
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
])
def test_smollm2_greedy_ids_equal_transformers_generate(prompt, smollm2, hf_gguf_model):
    model, tokenizer = smollm2
    ids = tokenizer(prompt)["input_ids"]
    num_new = 40
    out = hf_gguf_model.generate(
        torch.tensor([ids]),
        generation_config=GenerationConfig(max_new_tokens=num_new, do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id,
                                           output_scores=True, return_dict_in_generate=True),
    )
    ref_ids = out.sequences[0, len(ids):].tolist()
    checked = greedy_prefix_length(torch.stack(out.scores)[:, 0])
    assert checked >= 32, "choose a prompt without an early near-tie"
    ours = list(SimpleGenerator(model).generate(
        ids, SamplingParams(max_tokens=num_new, temperature=0.0)))
    assert ours[:checked] == ref_ids[:checked]
