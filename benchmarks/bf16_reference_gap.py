"""How far a bf16 prefill is from an fp32 one on the same weights: ours and transformers.

    python -m benchmarks.bf16_reference_gap [--model llama-3.1-8b] [--tokens 2000]

DESIGN.md §7 bounds ours (bf16 logits and per-layer K/V within relative RMS 1e-2 of fp32).
transformers + SDPA in bf16 against its own fp32 run, on the same bf16-rounded weights and
prompt, tells whether a gap is ours or the random-weight model's own sensitivity to rounding.
Prints a table and writes ``benchmarks/results/bf16_reference_gap.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_provenance_args, print_table, write_results
from benchmarks.ttft import build_transformers
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams


def rel_rms(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


class LogitsCapture:
    """The model as an engine sees it, keeping the logits the engine computes."""

    def __init__(self, model):
        self.model, self.logits = model, None

    def __call__(self, *args):
        return self.model(*args)

    def compute_logits(self, hidden):
        self.logits = self.model.compute_logits(hidden)
        return self.logits

    def __getattr__(self, name):
        return getattr(self.model, name)


def prefill_logits_and_kv(model, name: str, trianglemix, request: EngineRequest):
    """Our engine's prefill of ``request``: (last-position logits fp32 on the CPU, its KV)."""
    capture = LogitsCapture(model)
    result = PrefillEngine(capture, model_name=name, trianglemix=trianglemix).prefill(request)
    return capture.logits[-1].float().cpu(), result.kv


@torch.inference_mode()
def theirs(hf, ids):
    return hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float().cpu()


def measure(model_name: str, num_tokens: int) -> list[dict]:
    """One row per mode (dense, trianglemix): relative RMS of our bf16 logits and per-layer K/V
    against our fp32 run, and (dense row) transformers' bf16 against its fp32 run and our fp32
    logits against transformers' fp32 ones. Same weights and prompt (seed 0) everywhere."""
    source = ModelSource(name=f"random:{model_name}", random_config=model_name)
    model = load_model(source, device="cuda", dtype=torch.bfloat16)
    hf = build_transformers(model, source)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(0))
    request = EngineRequest.create("gap", prompt.tolist(), SamplingParams(temperature=0.0),
                                   vocab_size=vocab, context=model.config.max_context_tokens)
    ids = prompt[None].cuda()
    modes = {"dense": None, "trianglemix": published_trianglemix(model_name)}
    bf16 = {m: prefill_logits_and_kv(model, source.name, tm, request) for m, tm in modes.items()}
    hf_bf16 = theirs(hf, ids)
    hf.float()  # its own copy: build_transformers shared tensors that .float() replaces
    model.float()
    fp32 = {m: prefill_logits_and_kv(model, source.name, tm, request) for m, tm in modes.items()}
    hf_fp32 = theirs(hf, ids)
    rows = []
    for mode in modes:
        (lb, kvb), (lf, kvf) = bf16[mode], fp32[mode]
        k_err = [rel_rms(kvb.k[i], kvf.k[i]) for i in range(model.config.num_layers)]
        v_err = [rel_rms(kvb.v[i], kvf.v[i]) for i in range(model.config.num_layers)]
        rows.append({"mode": mode, "tokens": num_tokens, "ours_logits_rel_rms": rel_rms(lb, lf),
                     "ours_kv_rel_rms_max": max(k_err + v_err),
                     "ours_kv_first_layer_over_1e-2": next(
                         (i for i, (a, b) in enumerate(zip(k_err, v_err)) if max(a, b) > 1e-2),
                         None),
                     "transformers_logits_rel_rms": rel_rms(hf_bf16, hf_fp32) if mode == "dense"
                     else None,
                     "ours_fp32_vs_transformers_fp32": rel_rms(lf, hf_fp32) if mode == "dense"
                     else None,
                     "k_rel_rms_per_layer": k_err, "v_rel_rms_per_layer": v_err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--tokens", type=int, default=2000)
    add_provenance_args(parser)
    args = parser.parse_args()
    rows = measure(args.model, args.tokens)
    write_results("bf16_reference_gap", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                  extra={"model": f"random:{args.model}"})
    print_table(rows, ["mode", "tokens", "ours_logits_rel_rms", "ours_kv_rel_rms_max",
                       "ours_kv_first_layer_over_1e-2", "transformers_logits_rel_rms",
                       "ours_fp32_vs_transformers_fp32"])


if __name__ == "__main__":
    main()
