"""TriangleMix fidelity on SmolLM2-135M-Instruct (real weights): RULER-style tasks and NLL.

    python -m benchmarks.fidelity [--lengths 2048 4096 8192] [--samples 300]
        [--probed-layers 3,7,...] [--probe-json probe.json] [--device cuda] [--plot]
    python -m benchmarks.fidelity --plot-only      # the plot from benchmarks/results/fidelity.json

Configurations, each scored on the same samples: dense prefill; TriangleMix with the probed
layer set; TriangleMix with the deep half (layers 15-29). Every sample is scored teacher-forced
(``disagg.fidelity.scoring``): prompt rows attend as the prefill would, the answer rows densely
as decode does, so "correct" means greedy decoding emits the reference answer. Tasks
(``disagg.fidelity.tasks``) are generated offline from a seed at each nominal length (prompt +
answer within it); the NLL task scores the last ``n_last`` = 128 tokens of windows of the Python
standard library's sources (``fidelity_text``) after a prompt of the rest. Paired differences
(TriangleMix - dense) per sample, mean and 95% normal-approximation interval. Results:
``benchmarks/results/fidelity.json`` (written after every cell), plot ``fidelity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.fidelity_text import StdlibCorpus
from disagg.attention.triangle import PUBLISHED_TRIANGLE_LAYERS, TriangleMixConfig
from disagg.fidelity.scoring import score_continuations
from disagg.fidelity.tasks import TASKS, generate_task
from disagg.models.loader import load_model, load_tokenizer, resolve_model

DEEP_HALF = tuple(range(15, 30))
NLL_TASK = "nll_python_stdlib"
NLL_TOKENS = 128  # TriangleParams().n_last
COLUMNS = ["task", "context_tokens", "layers", "n_samples", "dense_score", "trianglemix_score",
           "delta", "delta_ci95"]


def paired_ci(dense: list[float], sparse: list[float]) -> tuple[float, list[float]]:
    """Mean of ``sparse - dense`` and its 95% interval (normal approximation)."""
    d = torch.tensor(sparse, dtype=torch.float64) - torch.tensor(dense, dtype=torch.float64)
    mean = float(d.mean())
    half = 1.96 * float(d.std(unbiased=True)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return mean, [mean - half, mean + half]


def score_all(model, prompts: list[list[int]], answers: list[list[int]],
              config: TriangleMixConfig | None, batch_tokens: int, label: str):
    """Per-sample (exact, nll per token) of one configuration, batched by ``batch_tokens``."""
    from tqdm import tqdm

    total = len(prompts[0]) + max(len(a) for a in answers)
    batch = max(1, batch_tokens // total)
    exact, nll = [], []
    for i in tqdm(range(0, len(prompts), batch), desc=label, file=sys.stderr, mininterval=2.0):
        s = score_continuations(model, torch.tensor(prompts[i:i + batch]),
                                answers[i:i + batch], config)
        exact += [100.0 * e for e in s.exact]
        nll += [x / n for x, n in zip(s.nll, s.num_tokens)]
    return exact, nll


def cell_rows(task: str, metric: str, length: int, dense: list[float],
              sparse: dict[str, list[float]]) -> list[dict]:
    rows = []
    for layers, scores in sparse.items():
        delta, ci = paired_ci(dense, scores)
        rows.append({"task": task, "metric": metric, "context_tokens": length, "layers": layers,
                     "n_samples": len(dense), "dense_score": sum(dense) / len(dense),
                     "trianglemix_score": sum(scores) / len(scores), "delta": delta,
                     "delta_ci95": ci, "source": "engine"})
    return rows


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["source"] == "engine"]
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == NLL_TASK, t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = [r for r in rows if r["task"] == task]
        lengths = sorted({r["context_tokens"] for r in cells})
        first = [next(r for r in cells if r["context_tokens"] == n) for n in lengths]
        ax.plot(lengths, [r["dense_score"] for r in first], "k-o", label="dense")
        for layers, style in (("probed", "C0-s"), ("deep_half", "C1-^")):
            pts = [r for r in cells if r["layers"] == layers]
            pts.sort(key=lambda r: r["context_tokens"])
            ax.plot([r["context_tokens"] for r in pts], [r["trianglemix_score"] for r in pts],
                    style, label=f"TriangleMix {layers}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("NLL (nats/token)" if task == NLL_TASK else "accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct fidelity ({data['device']}, {data['commit'][:7]})",
                 fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 4096, 2048])
    parser.add_argument("--samples", type=int, default=300, help="per task and length")
    parser.add_argument("--tasks", nargs="+", default=[*TASKS, NLL_TASK])
    parser.add_argument("--probed-layers", default=None, help="comma-separated layer ids")
    parser.add_argument("--probe-json", type=Path, default=None,
                        help="the probe-layers output whose 'recommended' set is 'probed'")
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--plot", action="store_true", help="also draw the plot at the end")
    parser.add_argument("--plot-only", action="store_true")
    add_provenance_args(parser)
    args = parser.parse_args()
    out = args.out or RESULTS_DIR / "fidelity.json"
    if args.plot_only:
        print(plot(out))
        return

    from disagg.cli import default_cache_dir

    if args.probe_json:
        probed = tuple(json.loads(args.probe_json.read_text())["recommended"])
    elif args.probed_layers:
        probed = tuple(int(x) for x in args.probed_layers.split(","))
    else:
        parser.error("give --probed-layers or --probe-json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    source = resolve_model(args.model, cache_dir=args.cache_dir or default_cache_dir())
    model = load_model(source, device=device, dtype=dtype)
    tokenizer = load_tokenizer(source)
    configs = {"probed": TriangleMixConfig(probed), "deep_half": TriangleMixConfig(DEEP_HALF)}
    shipped = tuple(PUBLISHED_TRIANGLE_LAYERS["smollm2-135m"])
    default = "probed" if shipped == configs["probed"].triangle_layers else "deep_half"
    extra = {"model": source.name, "dtype": str(dtype).removeprefix("torch."),
             "default_layers": default, "layer_sets": {k: list(c.triangle_layers)
                                                      for k, c in configs.items()},
             "stdlib_python": platform.python_version(), "seconds": {}}
    corpus = StdlibCorpus(tokenizer)
    rows: list[dict] = []
    for length in args.lengths:
        for task in args.tasks:
            t0 = time.perf_counter()
            if task == NLL_TASK:
                windows = corpus.windows(length, args.samples)
                prompts = [w[:-NLL_TOKENS] for w in windows]
                answers = [w[-NLL_TOKENS:] for w in windows]
            else:
                samples = generate_task(tokenizer, task, length, args.samples)
                prompts = [s.prompt_ids for s in samples]
                answers = [s.answer_ids for s in samples]
            pick = 1 if task == NLL_TASK else 0  # (exact, nll): accuracy or NLL
            metric = "nll" if task == NLL_TASK else "accuracy"
            dense = score_all(model, prompts, answers, None, args.batch_tokens,
                              f"{task} {length} dense")[pick]
            sparse = {name: score_all(model, prompts, answers, cfg, args.batch_tokens,
                                      f"{task} {length} {name}")[pick]
                      for name, cfg in configs.items()}
            rows += cell_rows(task, metric, length, dense, sparse)
            extra["seconds"][f"{task}/{length}"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rows[-2:]), flush=True)
            write_results("fidelity", rows, commit=args.commit, dirty=args.dirty, out=out,
                          extra=extra)
    print_table(rows, COLUMNS)
    if args.plot:
        print(plot(out))


if __name__ == "__main__":
    main()
