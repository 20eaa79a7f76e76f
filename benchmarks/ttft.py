"""Prefill TTFT on one GPU: our engine (dense and TriangleMix) against transformers + SDPA.

    python -m benchmarks.ttft [--lengths 8192 32768 65536 131072] [--repeats 2]

Random weights of a named config (Llama-3.1-8B by default), bf16, token-id prompts (seed 0).
Our engine and transformers share the same weight tensors (transformers is built on the meta
device and handed ours; the q/k/v and gate/up matrices, packed in ours, as copies of its own),
so peak memory is one copy of the weights plus each run's own buffers (transformers' copies
are subtracted from its peak). Per prompt length and mode: one warm-up prefill, ``--repeats``
timed prefills (``ours_s``: median, wall clock to token 0), then one instrumented pass (CUDA
events around every layer's attention call, KV store included: ``attention_s``;
``other_s = ours_s - attention_s``). The instrumented pass comes last so that no first-call
cost at a new length (allocator growth, cuDNN plans) lands in its events. Our dense layers run
the kernel the warm-up measured fastest (``dense_kernels``: cuDNN or FlashAttention-4).
transformers (``use_cache=True``, logits of the last position only): one warm-up and
``--repeats`` timed runs with torch's SDPA dispatch as a user gets it (``transformers_s``; the
attention kernels it ran are in ``transformers_sdpa_kernels``) and, with
``--transformers-cudnn``, with only cuDNN enabled (``transformers_cudnn_s``: the strongest
transformers baseline). Before anything else, ``warm_up_prefill`` runs and the first and second
32K TriangleMix prefills after it are timed (the first must not be slower).
Results: ``benchmarks/results/ttft.json``, written after every point.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from disagg_kernels.triangle_mix import num_kept_pairs
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import add_provenance_args, print_table, unshared_state_dict, write_results
from disagg.attention import dense_backends
from disagg.attention.dense_backends import wall_seconds
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.warmup import warm_up_prefill
from disagg.request import EngineRequest

COLUMNS = ["context_tokens", "mode", "ours_s", "attention_s", "other_s", "transformers_s",
           "speedup", "transformers_cudnn_s", "speedup_vs_cudnn", "peak_gib", "tflops"]


class _TimedAttention:
    """Attention metadata proxy: CUDA events around every ``attend`` call."""

    def __init__(self, inner, events: list):
        self.inner, self.events = inner, events

    def attend(self, layer_idx, q, k, v):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.inner.attend(layer_idx, q, k, v)
        end.record()
        self.events.append((start, end))
        return out


class _TimedModel:
    """The model as an engine sees it, with each forward's metadata wrapped in the proxy."""

    def __init__(self, model):
        self.model, self.events = model, []

    def __call__(self, input_ids, positions, metadata):
        return self.model(input_ids, positions, _TimedAttention(metadata, self.events))

    def __getattr__(self, name):
        return getattr(self.model, name)

    def attention_s(self) -> float:
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        self.events.clear()
        return total


def time_transformers(hf, req: EngineRequest, repeats: int, sdpa: str = "default"
                      ) -> tuple[float, float]:
    """(median seconds, peak GiB) of transformers' prefill of ``req`` after one warm-up, with
    torch's SDPA dispatch as a user gets it (``default``) or with only cuDNN enabled (``cudnn``,
    the fastest kernel torch ships for these shapes: the strongest transformers baseline)."""
    ids = torch.tensor([req.prompt_token_ids], device=hf.device)

    @torch.inference_mode()
    def prefill():
        if sdpa == "cudnn":
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        else:
            hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1)

    prefill()
    torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(wall_seconds(prefill) for _ in range(repeats))
    # Its copies of our packed weights are not counted: one copy of the weights, as ours.
    return seconds, (torch.cuda.max_memory_allocated() - hf.copied_weight_bytes) / 2**30


def sdpa_kernel_names(hf, n: int = 2048) -> dict[str, list[str]]:
    """The attention kernels of one transformers prefill of ``n`` tokens, per SDPA dispatch."""
    ids = torch.randint(0, hf.config.vocab_size, (1, n), device=hf.device)
    names = {}
    for sdpa in ("default", "cudnn"):
        with torch.inference_mode(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            if sdpa == "cudnn":
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        names[sdpa] = sorted({e.name[:80] for e in prof.events()
                              if e.device_type == torch.autograd.DeviceType.CUDA and any(
                                  w in e.name.lower() for w in ("flash", "cudnn", "fmha",
                                                                "attention", "sdpa"))})
    return names


def _request(n: int, vocab: int, context: int) -> EngineRequest:
    """``n`` random token ids, at most ``context - 1`` (vLLM's length rule leaves one token to
    generate: the "128K" point of a 131072-token model is a 131071-token prompt)."""
    n = min(n, context - 1)
    return EngineRequest.random_prefill(f"ttft-{n}", n, vocab_size=vocab, context=context)


def build_transformers(model, source: ModelSource):
    """transformers' Llama with SDPA holding ``model``'s weight tensors (its own copies of the
    packed ones: ``unshared_state_dict``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**source.hf_config())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                              dtype=torch.bfloat16)
    state, copied = unshared_state_dict(model)
    hf.load_state_dict(state, assign=True, strict=True)
    hf.copied_weight_bytes = copied
    device = next(model.parameters()).device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)  # a meta buffer
    return hf.eval()


def fused_op_timings(config, n: int) -> dict[str, float]:
    """Milliseconds per call (``triton.testing.do_bench`` median) of each fused op against the
    unfused PyTorch it replaced, on ``n`` tokens; the add + norm with an fp32 and a bf16
    residual stream (the residual's dtype is decided by this cost and by DESIGN.md §7)."""
    import torch.nn.functional as F
    from disagg_kernels.fused import add_rms_norm, rope, silu_mul
    from triton.testing import do_bench

    from disagg.models.rope import inverse_frequencies, rope_cos_sin

    h, d, bf16 = config.hidden_size, config.head_dim, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", dtype=bf16, generator=g)
    w = torch.ones(h, device="cuda", dtype=bf16)
    res32, res16 = x.float(), x.clone()
    q = torch.randn(n, config.num_heads, d, device="cuda", dtype=bf16, generator=g)
    cos, sin = rope_cos_sin(inverse_frequencies(config.rope, d).cuda(),
                            torch.arange(n, device="cuda"))
    cos2, sin2 = (torch.cat((t, t), -1).to(bf16)[:, None] for t in (cos, sin))
    gate = torch.randn(n, config.intermediate_size, device="cuda", dtype=bf16, generator=g)
    up = torch.randn_like(gate)
    packed = torch.cat((gate, up), dim=-1).chunk(2, dim=-1)  # the fused gate/up product

    def unfused_add_norm():
        r = res32 + x
        hr = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * hr.to(bf16)

    def unfused_rope():
        half = d // 2
        return q * cos2 + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin2

    cases = {
        "add_rms_norm_fp32_residual": lambda: add_rms_norm(x, res32, w, 1e-5),
        "add_rms_norm_bf16_residual": lambda: add_rms_norm(x, res16, w, 1e-5),
        "add_rms_norm_unfused_fp32_residual": unfused_add_norm,
        "rope_q": lambda: rope(q, cos, sin),
        "rope_q_unfused": unfused_rope,
        "silu_mul": lambda: silu_mul(gate, up, out=gate),
        "silu_mul_packed": lambda: silu_mul(*packed, out=packed[0]),
        "silu_mul_unfused": lambda: F.silu(gate) * up,
    }
    return {name: float(do_bench(fn, warmup=5, rep=50)) for name, fn in cases.items()}


def startup_checks(engines: dict[str, PrefillEngine], config, context: int) -> dict:
    """warm_up_prefill of each engine, then the first and second 32K TriangleMix prefills after
    it (the first must be no slower), then the fused-op timings."""
    warmup = {mode: warm_up_prefill(e) for mode, e in engines.items()}
    tuned = warmup["dense"].dense_kernels
    first_n = min(32768, context - 1)
    req = _request(first_n, config.vocab_size, context)
    first_s = [wall_seconds(engines["trianglemix"].prefill, req) for _ in range(2)]
    print(f"warm-up {[round(w.seconds, 2) for w in warmup.values()]} s; first/second "
          f"{first_n}-token TriangleMix prefill after it: {first_s[0]:.3f} / {first_s[1]:.3f} s",
          flush=True)
    ops = {"context_tokens": first_n, **fused_op_timings(config, first_n)}
    print(ops, flush=True)
    return {
        "warmup_s": {m: round(w.seconds, 2) for m, w in warmup.items()},
        "warmup_prompt_lengths": {m: list(w.prompt_lengths) for m, w in warmup.items()},
        "dense_kernels": dense_kernel_rows(tuned),
        "first_after_warmup": {"context_tokens": first_n, "first_s": first_s[0],
                               "second_s": first_s[1]},
        "fused_ops_ms": ops,
    }


def dense_kernel_rows(timings) -> list[dict]:
    """The warm-up's measured choice of dense-attention kernel per length bucket."""
    return [t.as_row() for t in timings]


def model_flops(config, n: int, triangle_layers: int, params) -> float:
    """Matrix-product FLOPs of a prefill of ``n`` tokens (layers + one row of LM head)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    qkvo = 2 * h * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    per_token = config.num_layers * (qkvo + 2 * 3 * h * i)
    dense_pairs = n * (n + 1) // 2
    pairs = ((config.num_layers - triangle_layers) * dense_pairs
             + triangle_layers * num_kept_pairs(n, params))
    return per_token * n + 4 * pairs * d * config.num_heads + 2 * h * config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="random config name")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--transformers-cudnn", action="store_true",
                        help="also time transformers with only SDPA's cuDNN backend enabled")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip warm_up_prefill, the first-vs-second check and the op timings")
    add_provenance_args(parser)
    args = parser.parse_args()
    torch.manual_seed(0)

    source = ModelSource(name=f"random:{args.model}", random_config=args.model)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    config, context = model.config, model.config.max_context_tokens
    trianglemix = published_trianglemix(args.model)
    engines = {"dense": PrefillEngine(model, model_name=source.name),
               "trianglemix": PrefillEngine(model, model_name=source.name,
                                            trianglemix=trianglemix)}
    timed_model = _TimedModel(model)
    timed = {mode: PrefillEngine(timed_model, model_name=source.name, trianglemix=e.trianglemix)
             for mode, e in engines.items()}
    hf = None if args.no_transformers else build_transformers(model, source)
    weights_gib = torch.cuda.memory_allocated() / 2**30

    extra = {"model": source.name, "dtype": "bfloat16", "weights_gib": round(weights_gib, 2),
             "dense_attention": os.environ.get(dense_backends.ENV_VAR, "auto"),
             "fa4_available": dense_backends.fa4_available()}
    if hf is not None:
        extra["transformers_sdpa_kernels"] = sdpa_kernel_names(hf)
        print(extra["transformers_sdpa_kernels"], flush=True)
    if not args.no_startup:
        extra.update(startup_checks(engines, config, context))
    else:
        extra["dense_kernels"] = dense_kernel_rows(dense_backends.tune_causal(
            torch.device("cuda"), num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, dtype=torch.bfloat16, max_tokens=max(args.lengths),
            calls_per_prompt=config.num_layers))

    rows = []
    for n in args.lengths:  # in the order given: the session script runs the targets first
        req = _request(n, config.vocab_size, context)
        num_prompt = req.num_prompt_tokens
        hf_s, hf_peak = time_transformers(hf, req, args.repeats) if hf else (None, None)
        hf_cudnn_s = (time_transformers(hf, req, args.repeats, "cudnn")[0]
                      if hf and args.transformers_cudnn else None)
        for mode, engine in engines.items():
            torch.cuda.empty_cache()
            engine.prefill(req)
            torch.cuda.reset_peak_memory_stats()
            ours_s = statistics.median(wall_seconds(engine.prefill, req)
                                       for _ in range(args.repeats))
            peak = torch.cuda.max_memory_allocated() / 2**30
            timed[mode].prefill(req)
            attention_s = timed_model.attention_s()
            layers = len(engine.trianglemix.triangle_layers) if engine.trianglemix else 0
            flops = model_flops(config, num_prompt, layers, trianglemix.params)
            rows.append({
                "context_tokens": n, "prompt_tokens": num_prompt, "mode": mode, "ours_s": ours_s,
                "attention_s": attention_s, "other_s": ours_s - attention_s,
                "transformers_s": hf_s, "speedup": hf_s / ours_s if hf_s else None,
                "transformers_cudnn_s": hf_cudnn_s,
                "speedup_vs_cudnn": hf_cudnn_s / ours_s if hf_cudnn_s else None,
                "peak_gib": peak, "transformers_peak_gib": hf_peak, "tflops": flops / ours_s / 1e12,
            })
            print(rows[-1], flush=True)
            rows.sort(key=lambda r: (r["context_tokens"], r["mode"]))
            write_results("ttft", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                          extra=extra)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
