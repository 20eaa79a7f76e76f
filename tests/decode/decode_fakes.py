"""Test doubles for the decode tests: a fake prefill side and small drivers."""

from __future__ import annotations

import torch

from disagg.attention.contiguous import ContiguousAttention, ContiguousKVCache
from disagg.decode.engine import DecodeEngine
from disagg.kv.layout import KVFingerprint, KVLayout, PackedKV
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, SamplingParams, sample
from disagg.transport.base import KVCompletion, KVHeader
from disagg.transport.direct import DirectKVSender


def request(model, request_id: str, prompt_ids, **params) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    return EngineRequest.create(request_id, prompt_ids, SamplingParams(**params),
                                vocab_size=model.config.vocab_size,
                                context=model.config.max_context_tokens)


@torch.inference_mode()
def all_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position of ``ids`` (one dense prefill forward, teacher forcing)."""
    c = model.config
    cache = ContiguousKVCache.allocate(num_layers=c.num_layers, max_tokens=len(ids),
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       dtype=torch.float32, device="cpu")
    hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                   ContiguousAttention(cache, 0, model.scale))
    return model.compute_logits(hidden)


def reference_scores(model, prompt_ids, generated_ids) -> torch.Tensor:
    """``[steps, V]``: the logits each generated token was picked from, on the reference."""
    n = len(prompt_ids)
    logits = all_logits(model, list(prompt_ids) + list(generated_ids))
    return logits[n - 1:n - 1 + len(generated_ids)]


@torch.inference_mode()
def fake_prefill(model, req: EngineRequest, *, model_name: str, attention: str = "dense"
                 ) -> tuple[SampledToken, PackedKV, KVFingerprint]:
    """What a prefill engine produces: token 0, the prompt's KV, its fingerprint."""
    c, n = model.config, req.num_prompt_tokens
    cache = ContiguousKVCache.allocate(num_layers=c.num_layers, max_tokens=n,
                                       num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       dtype=torch.float32, device="cpu")
    hidden = model(torch.tensor(req.prompt_token_ids), torch.arange(n),
                   ContiguousAttention(cache, 0, model.scale))
    first = sample(model.compute_logits(hidden[-1:])[0], req.params, req.seed, 0)
    kv = PackedKV(k=[k.clone() for k in cache.k], v=[v.clone() for v in cache.v])
    layout = KVLayout.of_model(model)
    return first, kv, KVFingerprint(model_name, str(layout.dtype), layout.tag, attention, n)


def write_kv(sender: DirectKVSender, offers, req: EngineRequest, first: SampledToken,
             kv: PackedKV, fingerprint: KVFingerprint, *, num_layers: int | None = None
             ) -> KVCompletion:
    """What the prefill side does: write every layer (or only ``num_layers``) into the
    offered destination and return the completion record."""
    writer = sender.open(offers[0], num_layers=len(kv.k))
    for layer in range(len(kv.k) if num_layers is None else num_layers):
        writer.write_layer(layer, kv.k[layer], kv.v[layer])
    return writer.finish(KVHeader(req.request_id, fingerprint, first.token_id))


def run_to_end(engine: DecodeEngine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until nothing is left; return each request's outputs."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def token_ids(outputs) -> list[int]:
    return [o.token.token_id for o in outputs if o.token is not None]
