"""Component costs of one engine on this machine, for the simulator: prefill seconds vs prompt
length (``PrefillEngine.prefill``, no serving layer) and decode step seconds vs batch
(``DecodeEngine.step``), with the torch thread count a replica of the app would use.

    python -m benchmarks.simulator.calibrate --setup cpu --model random:smollm2-135m \\
        --threads 1 --lengths 256 384 512 768 --batches 1 4 8

Writes ``benchmarks/results/sim_calibration_<setup>.json`` (rows ``kind`` = prefill | decode).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.decode_cpu import engine_row
from disagg.cli import default_cache_dir
from disagg.models.loader import load_model, resolve_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams


def prefill_rows(model, name: str, lengths: list[int], repeats: int) -> list[dict]:
    engine = PrefillEngine(model, model_name=name)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    rows = []
    for i, n in enumerate([lengths[0], *lengths]):  # the first one warms up
        times = []
        for r in range(repeats):
            prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
            request = EngineRequest.create(f"p{i}.{r}", prompt, params, vocab_size=vocab,
                                           context=model.config.max_context_tokens)
            t0 = time.perf_counter()
            engine.prefill(request)
            times.append(time.perf_counter() - t0)
        if i:
            rows.append({"kind": "prefill", "prompt_tokens": n,
                         "seconds": statistics.median(times), "repeats": repeats})
    return rows


def decode_rows(model, batches: list[int], prompt_tokens: int) -> list[dict]:
    args = SimpleNamespace(prompt_tokens=prompt_tokens, warmup_steps=2, decode_steps=8)
    rows = []
    for b in batches:
        row = engine_row(model, b, args)
        rows.append({"kind": "decode", "batch": b,
                     "context_tokens": prompt_tokens + 3 + args.decode_steps // 2,
                     "step_s": row["step_ms_p50"] / 1e3})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default="cpu")
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 384, 512, 768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--decode-prompt-tokens", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    add_provenance_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.model, cache_dir=default_cache_dir()))
    rows = prefill_rows(model, args.model, args.lengths, args.repeats)
    rows += decode_rows(model, args.batches, args.decode_prompt_tokens)
    path = write_results(f"sim_calibration_{args.setup}", rows, commit=args.commit,
                         dirty=args.dirty,
                         out=args.out or RESULTS_DIR / f"sim_calibration_{args.setup}.json",
                         extra={"model": args.model, "threads": args.threads})
    print_table(rows, ["kind", "prompt_tokens", "seconds", "batch", "step_s"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
