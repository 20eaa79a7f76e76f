"""The ``generate`` command: resolve, validate, load, stream."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from disagg.cli import check_text_prompt
from disagg.detokenize import IncrementalDetokenizer
from disagg.generate import GenerationStats, SimpleGenerator
from disagg.models.loader import load_model, load_tokenizer, resolve_model
from disagg.request import resolve_max_tokens, validate_prompt
from disagg.sampling import SamplingParams


def run_generate(args: argparse.Namespace, cache_dir: Path) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
    )
    t0 = time.perf_counter()
    source = resolve_model(args.model, cache_dir=cache_dir)
    check_text_prompt(args.prompt, source.has_tokenizer, args.model)
    config = source.model_config()
    tokenizer = load_tokenizer(source)
    if args.prompt is not None:
        prompt_ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    else:
        prompt_ids = args.prompt_token_ids
    # Validate before loading weights: a bad request costs nothing.
    validate_prompt(prompt_ids, vocab_size=config.vocab_size)
    resolve_max_tokens(len(prompt_ids), params.max_tokens, context=config.max_context_tokens)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = load_model(source, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0

    stats = GenerationStats()
    detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
    generated: list[int] = []
    text_parts: list[str] = []
    for token in SimpleGenerator(model).generate(prompt_ids, params, stats):
        generated.append(token)
        delta = detok.push(token) if detok is not None else ""
        text_parts.append(delta)
        if not args.json and delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
    text = "".join(text_parts)
    if args.json:
        print(json.dumps({"model": args.model, "prompt_token_ids": list(prompt_ids),
                          "token_ids": generated, "text": text if detok else None}))
    else:
        sys.stdout.write("\n")
    print(
        f"[{args.model} on {device}] load {load_s:.2f} s | prefill {stats.num_prompt_tokens} "
        f"tokens in {stats.prefill_s:.3f} s ({stats.prefill_tokens_per_s:.1f} tok/s) | decode "
        f"{stats.num_generated_tokens} tokens at {stats.decode_tokens_per_s:.1f} tok/s",
        file=sys.stderr,
    )
    return 0
