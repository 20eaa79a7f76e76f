"""The prefill engine on CUDA (bf16, Triton Triangle layers) against the fp32 CPU path."""

from __future__ import annotations

import pytest
import torch
from disagg_kernels.triangle_mix import TriangleParams

from disagg.attention.triangle import TriangleMixConfig, published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def rel_rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("name, trianglemix, n", [
    ("smollm2-135m", published_trianglemix("smollm2-135m"), 3000),
    ("smollm2-135m", None, 3000),
    ("tiny-llama", TriangleMixConfig((1, 2, 3), TriangleParams(4, 32, 16)), 777),
])
def test_cuda_bf16_prefill_matches_cpu_fp32(name, trianglemix, n):
    source = ModelSource(name=name, random_config=name, seed=0)
    gpu_model = load_model(source, device="cuda", dtype=torch.bfloat16)
    # The fp32 reference uses the same bf16-rounded weights.
    cpu_model = load_model(source, device="cuda", dtype=torch.bfloat16).float().cpu()
    vocab = gpu_model.config.vocab_size
    prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    request = EngineRequest.create("r", prompt, SamplingParams(temperature=0.0, max_tokens=1),
                                   vocab_size=vocab, context=8192)
    gpu = PrefillEngine(gpu_model, model_name=name, trianglemix=trianglemix).prefill(request)
    cpu = PrefillEngine(cpu_model, model_name=name, trianglemix=trianglemix).prefill(request)
    for layer in range(gpu_model.config.num_layers):
        assert rel_rms(gpu.kv.k[layer].cpu(), cpu.kv.k[layer]) < 1e-2, layer
        assert rel_rms(gpu.kv.v[layer].cpu(), cpu.kv.v[layer]) < 1e-2, layer
    assert gpu.fingerprint.attention == cpu.fingerprint.attention
