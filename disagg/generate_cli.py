"""The ``generate`` command: resolve, validate, load, stream.

Colocated (default): ``SimpleGenerator``. ``--disaggregated``: ``PrefillEngine`` -> in-process
KV hand-off -> ``DecodeEngine``. Both stream through the same ``OutputProcessor`` (stop
strings, UTF-8-safe detokenization).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from disagg.attention.triangle import TriangleMixConfig, published_trianglemix
from disagg.cli import check_text_prompt
from disagg.errors import InvalidRequestError
from disagg.generate import GenerationStats, SimpleGenerator
from disagg.inprocess import InProcessDisaggregated
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import load_model, load_tokenizer, resolve_model
from disagg.output import OutputProcessor
from disagg.request import EngineRequest
from disagg.sampling import SampledToken, SamplingParams


def _trianglemix(args: argparse.Namespace, source) -> TriangleMixConfig | None:
    if not args.trianglemix:
        return None
    architecture = source.random_config or source.name
    try:
        return published_trianglemix(architecture)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e


def _token_stream(args, model: LlamaForCausalLM, name: str, request: EngineRequest,
                  trianglemix: TriangleMixConfig | None, stats: GenerationStats):
    if not args.disaggregated:
        generator = SimpleGenerator(model, trianglemix=trianglemix)
        return (SampledToken(t) for t in generator.generate(
            request.prompt_token_ids, request.params, stats, seed=request.seed))
    pipeline = InProcessDisaggregated.build(model, model_name=name, trianglemix=trianglemix,
                                            eos_token_ids=model.config.eos_token_ids)
    return pipeline.generate(request)


def run_generate(args: argparse.Namespace, cache_dir: Path) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop),
    )
    t0 = time.perf_counter()
    source = resolve_model(args.model, cache_dir=cache_dir)
    check_text_prompt(args.prompt, source.has_tokenizer, args.model)
    config = source.model_config()
    trianglemix = _trianglemix(args, source)
    tokenizer = load_tokenizer(source)
    if args.prompt is not None:
        prompt_ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    else:
        prompt_ids = args.prompt_token_ids
    # Validate before loading weights: a bad request costs nothing.
    request = EngineRequest.create("cli", prompt_ids, params, vocab_size=config.vocab_size,
                                   context=config.max_context_tokens)
    processor = OutputProcessor(tokenizer, params)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = load_model(source, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0

    stats = GenerationStats()
    t_gen = time.perf_counter()
    tokens = _token_stream(args, model, args.model, request, trianglemix, stats)
    try:
        for token in tokens:
            n = len(processor.token_ids) + 1
            reason = "length" if n >= request.max_tokens else None
            delta = processor.push(token, reason)
            if not args.json and delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            if processor.finished:
                break
        else:
            delta = processor.push(None, "stop")
            if not args.json:
                sys.stdout.write(delta.text)
    finally:
        tokens.close()
    elapsed = time.perf_counter() - t_gen
    if args.json:
        print(json.dumps({"model": args.model, "prompt_token_ids": list(prompt_ids),
                          "token_ids": processor.token_ids,
                          "text": processor.text if tokenizer is not None else None,
                          "finish_reason": processor.finish_reason}))
    else:
        sys.stdout.write("\n")
    mode = "disaggregated" if args.disaggregated else "colocated"
    detail = (f"prefill {stats.num_prompt_tokens} tokens in {stats.prefill_s:.3f} s "
              f"({stats.prefill_tokens_per_s:.1f} tok/s) | decode {stats.num_generated_tokens} "
              f"tokens at {stats.decode_tokens_per_s:.1f} tok/s") if not args.disaggregated else (
              f"{len(processor.token_ids)} tokens in {elapsed:.2f} s")
    print(f"[{args.model} on {device}, {mode}] load {load_s:.2f} s | {detail}", file=sys.stderr)
    return 0
