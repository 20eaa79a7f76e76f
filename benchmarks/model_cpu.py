"""Model core on CPU: load time and SmolLM2 prefill/decode tokens/s, ours vs transformers.

Both run in the same process, fp32, greedy, with a KV cache, on the same weights (the
converted embedded model). Load time is measured for the first conversion (GGUF ->
safetensors, in a fresh cache directory) and for the cached load.

    python -m benchmarks.model_cpu [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from benchmarks.common import add_provenance_args, print_table, write_results
from disagg.cli import default_cache_dir
from disagg.generate import GenerationStats, SimpleGenerator
from disagg.models.embedded import EMBEDDED_MODEL, prepare_embedded
from disagg.models.loader import load_model, load_tokenizer, resolve_model
from disagg.sampling import SamplingParams


def time_load(cache_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as fresh:
        t0 = time.perf_counter()
        prepare_embedded(Path(fresh))
        first = time.perf_counter() - t0
    t0 = time.perf_counter()
    source = resolve_model(EMBEDDED_MODEL, cache_dir=cache_dir)
    load_model(source)
    load_tokenizer(source)
    cached = time.perf_counter() - t0
    return {"first_conversion_s": first, "cached_load_s": cached}


@torch.inference_mode()
def ours(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    stats = GenerationStats()
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    for _ in SimpleGenerator(model).generate(prompt, params, stats):
        pass
    return stats.prefill_tokens_per_s, stats.decode_tokens_per_s


@torch.inference_mode()
def transformers_(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True)
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(decode_tokens - 1):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t0
    return len(prompt) / prefill_s, (decode_tokens - 1) / decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_provenance_args(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    cache_dir = default_cache_dir()
    load = time_load(cache_dir)
    path = prepare_embedded(cache_dir)
    model = load_model(resolve_model(EMBEDDED_MODEL, cache_dir=cache_dir))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.randint(100, 40000, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    runs = {"ours": ours, "transformers": transformers_}
    for fn, m in ((ours, model), (transformers_, reference)):  # warm-up
        fn(m, prompt[:64], 4)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        samples["ours"].append(ours(model, prompt, args.decode_tokens))
        samples["transformers"].append(transformers_(reference, prompt, args.decode_tokens))
    rows = []
    for name, s in samples.items():
        rows.append({
            "engine": name,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "prefill_tokens_per_s": statistics.median(x[0] for x in s),
            "decode_tokens_per_s": statistics.median(x[1] for x in s),
            "threads": torch.get_num_threads(),
        })
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        rows[0][f"{key}_ratio_vs_transformers"] = rows[0][key] / rows[1][key]
    out = write_results("model_cpu", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                        extra={"model": EMBEDDED_MODEL, "load": load})
    print(f"load: first conversion {load['first_conversion_s']:.1f} s, "
          f"cached {load['cached_load_s']:.2f} s   -> {out}")
    print_table(rows, ["engine", "prefill_tokens_per_s", "decode_tokens_per_s"])


if __name__ == "__main__":
    main()
