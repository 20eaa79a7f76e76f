"""Dense causal attention on one GPU: cuDNN (torch SDPA) against FlashAttention-4, per length.

    python -m benchmarks.attention_backends [--lengths 8192 32768 65536 131072]

The shapes of a prefill's dense layer (Llama-3.1-8B: 32 query heads, 8 KV heads, head dim 128,
bf16, token-major ``[T, H, D]`` as the model holds them). Per length and kernel: the wall
seconds of the first call at that length (a new shape: cuDNN builds a plan, FA4 compiled once
before), the median of ``--repeats`` timed calls (CUDA events) and TFLOP/s of the causal
square; FA4's output against cuDNN's (relative RMS) and, at 4K, both against an fp32 SDPA.
Also the first FA4 call of the process (its JIT compilation). ``tune_causal``'s choice per
bucket (what the prefill warm-up would pick) closes the run. Results:
``benchmarks/results/attention_backends.json``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import add_provenance_args, print_table, versions, write_results
from disagg.attention import dense_backends as db

COLUMNS = ["context_tokens", "kernel", "ms", "first_call_ms", "tflops", "rel_rms_vs_cudnn"]


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _inputs(n: int, args) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    k = torch.randn(n, args.kv_heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    return q, k, torch.randn_like(k)


def fp32_check(args) -> dict:
    """Both kernels against an fp32 SDPA at 4K (the bf16 bound of DESIGN.md section 7)."""
    q, k, v = _inputs(4096, args)
    ref = F.scaled_dot_product_attention(*(x.float().transpose(0, 1) for x in (q, k, v)),
                                         is_causal=True, enable_gqa=True).transpose(0, 1)
    return {name: _rel_rms(db.causal_square(q, k, v, None, name), ref) for name in args.kernels}


def length_rows(n: int, args) -> list[dict]:
    """Every kernel at ``n`` tokens: first call, steady time, TFLOP/s, agreement with cuDNN."""
    q, k, v = _inputs(n, args)
    flops = 4 * (n * (n + 1) // 2) * args.head_dim * args.heads
    rows, outs = [], {}
    for name in args.kernels:
        first = db.wall_seconds(db.causal_square, q, k, v, None, name)
        outs[name] = db.causal_square(q, k, v, None, name)
        seconds = db.time_call(db.causal_square, q, k, v, None, name, repeats=args.repeats)
        rows.append({"context_tokens": n, "kernel": name, "ms": seconds * 1e3,
                     "first_call_ms": first * 1e3, "tflops": flops / seconds / 1e12,
                     "rel_rms_vs_cudnn": _rel_rms(outs[name], outs["cudnn"])})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    add_provenance_args(parser)
    args = parser.parse_args()
    args.kernels = ["cudnn"] + (["fa4"] if db.fa4_available() else [])
    extra: dict = {"fa4_available": db.fa4_available(), "shape": {
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "dtype": "bfloat16"}}
    if db.fa4_available():
        import importlib.metadata as md

        extra["fa4_version"] = md.version("flash-attn-4")
        extra["cutlass_dsl_version"] = md.version("nvidia-cutlass-dsl")
        extra["fa4_first_call_s"] = db.wall_seconds(db.causal_square, *_inputs(1024, args),
                                                    None, "fa4")
    print(versions(), extra, flush=True)
    extra["fp32_rel_rms_4k"] = fp32_check(args)
    print("vs fp32 at 4K:", extra["fp32_rel_rms_4k"], flush=True)

    rows = []
    for n in args.lengths:
        rows += length_rows(n, args)
        torch.cuda.empty_cache()
        write_results("attention_backends", rows, commit=args.commit, dirty=args.dirty,
                      out=args.out, extra=extra)
    timings = db.tune_causal(torch.device("cuda"), num_heads=args.heads,
                             num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                             dtype=torch.bfloat16, max_tokens=max(args.lengths))
    extra["tuned"] = [t.as_row() for t in timings]
    print("tuned:", extra["tuned"], flush=True)
    write_results("attention_backends", rows, commit=args.commit, dirty=args.dirty,
                  out=args.out, extra=extra)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
