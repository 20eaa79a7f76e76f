"""Decode engine on CPU: SmolLM2 decode tokens/s and step time at several batch sizes.

Each batch size gets a fresh ``DecodeEngine``: ``batch`` requests of ``--prompt-tokens``
random token ids (fixed seed), greedy, ``ignore_eos``. The first step prefills them all; a few
warm-up decode steps follow; then ``--decode-steps`` steps are timed, each producing one token
per request. The baseline, in the same process, is the single-request ``SimpleGenerator``
(contiguous KV cache) decoding the same prompt. Bytes per step = the weights once (a decode
step streams them all) + the K/V each sequence attends over, for the achieved GB/s.

    python -m benchmarks.decode_cpu [--batch-sizes 1 8 32] [--prompt-tokens 128]
        [--decode-steps 32] [--warmup-steps 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import add_provenance_args, print_table, write_results
from disagg.cli import default_cache_dir
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.generate import GenerationStats, SimpleGenerator
from disagg.kv.layout import KVLayout
from disagg.models.embedded import EMBEDDED_MODEL
from disagg.models.loader import load_model, resolve_model
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

BLOCK_SIZE = 16


def prompts(batch: int, num_tokens: int, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (num_tokens,), generator=g).tolist()
            for _ in range(batch)]


def weight_bytes(model) -> int:
    params = {id(p): p for p in model.parameters()}  # tied embeddings counted once
    return sum(p.numel() * p.element_size() for p in params.values())


def engine_row(model, batch: int, args) -> dict:
    c = model.config
    num_tokens = args.prompt_tokens + args.warmup_steps + args.decode_steps + 2
    config = DecodeConfig(block_size=BLOCK_SIZE,
                          num_blocks=batch * -(-num_tokens // BLOCK_SIZE),
                          max_num_seqs=batch,
                          max_num_batched_tokens=max(batch * args.prompt_tokens, batch))
    engine = DecodeEngine(model, config, model_name=EMBEDDED_MODEL)
    params = SamplingParams(max_tokens=args.warmup_steps + args.decode_steps + 1,
                            temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, args.prompt_tokens, c.vocab_size)):
        engine.add_request(EngineRequest.create(f"r{i}", prompt, params, vocab_size=c.vocab_size,
                                                context=c.max_context_tokens))
    t0 = time.perf_counter()
    first = engine.step()  # every prompt, one forward
    prefill_s = time.perf_counter() - t0
    assert len(first) == batch
    for _ in range(args.warmup_steps):
        engine.step()
    step_s = []
    for _ in range(args.decode_steps):
        t0 = time.perf_counter()
        outputs = engine.step()
        step_s.append(time.perf_counter() - t0)
        assert len(outputs) == batch, "every sequence decodes in every step"
    mean_context = args.prompt_tokens + args.warmup_steps + 1 + args.decode_steps / 2
    step_bytes = weight_bytes(model) + batch * mean_context * KVLayout.of_model(model).bytes_per_token
    mean_s = statistics.fmean(step_s)
    return {
        "engine": "DecodeEngine", "batch_size": batch, "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps,
        "decode_tokens_per_s": batch * args.decode_steps / sum(step_s),
        "step_ms": mean_s * 1e3, "step_ms_p50": statistics.median(step_s) * 1e3,
        "step_ms_p90": sorted(step_s)[int(0.9 * (len(step_s) - 1))] * 1e3,
        "prefill_s": prefill_s, "gbps": step_bytes / mean_s / 1e9,
        "num_forwards": engine.num_forwards,
    }


def baseline_row(model, args) -> dict:
    """The single-request generator (contiguous cache) on the same prompt length."""
    prompt = prompts(1, args.prompt_tokens, model.config.vocab_size)[0]
    params = SamplingParams(max_tokens=args.warmup_steps + args.decode_steps + 1,
                            temperature=0.0, ignore_eos=True)
    stats = GenerationStats()
    for _ in SimpleGenerator(model).generate(prompt, params, stats):
        pass
    step_s = stats.step_times_s[args.warmup_steps:]
    return {
        "engine": "SimpleGenerator", "batch_size": 1, "prompt_tokens": args.prompt_tokens,
        "decode_steps": len(step_s), "decode_tokens_per_s": len(step_s) / sum(step_s),
        "step_ms": statistics.fmean(step_s) * 1e3,
        "step_ms_p50": statistics.median(step_s) * 1e3,
        "step_ms_p90": sorted(step_s)[int(0.9 * (len(step_s) - 1))] * 1e3,
        "prefill_s": stats.prefill_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    add_provenance_args(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(resolve_model(EMBEDDED_MODEL, cache_dir=default_cache_dir()))
    load_before = os.getloadavg()[0]  # other work on the machine skews CPU timings: recorded
    rows = [baseline_row(model, args)]
    rows += [engine_row(model, batch, args) for batch in args.batch_sizes]
    for row in rows:
        row["threads"] = torch.get_num_threads()
    path = write_results("decode_cpu", rows, commit=args.commit, dirty=args.dirty,
                         out=args.out, extra={"model": EMBEDDED_MODEL, "dtype": "float32",
                                              "load_average_1m": [load_before,
                                                                  os.getloadavg()[0]]})
    print(f"wrote {path}")
    print_table(rows, ["engine", "batch_size", "decode_tokens_per_s", "step_ms", "step_ms_p90",
                       "prefill_s", "gbps"])


if __name__ == "__main__":
    main()
