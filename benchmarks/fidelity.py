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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.fidelity_text import StdlibCorpus
from disagg.attention.triangle import PUBLISHED_TRIANGLE_LAYERS, TriangleMixConfig
from disagg.fidelity.scoring import score_configs
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


def score_cell(model, prompts: list[list[int]], answers: list[list[int]],
               configs: dict[str, TriangleMixConfig | None], batch_tokens: int, label: str):
    """Per configuration, per sample (exact 0/100, nll per token), batched by ``batch_tokens``;
    the configurations share each batch's dense prefix (``score_configs``)."""
    from tqdm import tqdm

    total = len(prompts[0]) + max(len(a) for a in answers)
    batch = max(1, batch_tokens // total)
    exact = {name: [] for name in configs}
    nll = {name: [] for name in configs}
    for i in tqdm(range(0, len(prompts), batch), desc=label, file=sys.stderr, mininterval=5.0):
        scores = score_configs(model, torch.tensor(prompts[i:i + batch]), answers[i:i + batch],
                               configs)
        for name, s in scores.items():
            exact[name] += [100.0 * e for e in s.exact]
            nll[name] += [x / n for x, n in zip(s.nll, s.num_tokens)]
    return exact, nll


def cell_data(tokenizer, corpus, task: str, length: int, samples: int):
    """(prompts, answers) of one cell: a task's samples or the NLL windows."""
    if task == NLL_TASK:
        windows = corpus.windows(length, samples)
        return [w[:-NLL_TOKENS] for w in windows], [w[-NLL_TOKENS:] for w in windows]
    samples = generate_task(tokenizer, task, length, samples)
    return [s.prompt_ids for s in samples], [s.answer_ids for s in samples]


def summarize(rows: list[dict], threshold: float = 20.0, max_loss: float = 1.0) -> dict:
    """The issue's judgement per accuracy task: the longest length where dense scores above
    ``threshold`` (the judged length), and there per layer set the delta and whether it loses at
    most ``max_loss`` points; plus which layer set scores higher summed over judged cells."""
    out, totals = {}, {}
    rows = [r for r in rows if r.get("source", "engine") == "engine"]  # served rows: a check
    for task in sorted({r["task"] for r in rows if r["metric"] == "accuracy"}):
        cells = [r for r in rows if r["task"] == task and r["metric"] == "accuracy"]
        above = [r["context_tokens"] for r in cells if r["dense_score"] > threshold]
        if not above:
            out[task] = {"judged_length": None}
            continue
        judged = max(above)
        entry = {"judged_length": judged}
        for r in cells:
            if r["context_tokens"] == judged:
                entry[r["layers"]] = {"dense": r["dense_score"], "trianglemix":
                                      r["trianglemix_score"], "delta": r["delta"],
                                      "delta_ci95": r["delta_ci95"], "n": r["n_samples"],
                                      "within_target": r["delta"] >= -max_loss}
                totals[r["layers"]] = totals.get(r["layers"], 0.0) + r["trianglemix_score"]
        out[task] = entry
    return {"threshold": threshold, "max_loss_points": max_loss, "tasks": out,
            "trianglemix_score_sum_at_judged": totals}


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


def _score_ci(score: float, n: int, metric: str) -> float:
    """Half-width of a 95% interval of one configuration's accuracy (binomial, normal approx.);
    0 for NLL (its paired delta interval is in the table)."""
    if metric != "accuracy" or n < 2:
        return 0.0
    p = score / 100.0
    return 196.0 * math.sqrt(p * (1 - p) / n)


def plot(path: Path) -> Path:
    """Score vs length per configuration, one panel per task (accuracy with 95% intervals, the
    20% line the issue judges at), from ``fidelity.json``; written beside it as ``.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("source", "engine") == "engine"]
    tasks = [t for t in [*TASKS, NLL_TASK] if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = [r for r in rows if r["task"] == task]
        metric = cells[0]["metric"]
        lengths = sorted({r["context_tokens"] for r in cells})
        first = [next(r for r in cells if r["context_tokens"] == n) for n in lengths]
        series = [("dense", "k-o", 1.0, first, "dense_score")]
        series += [(f"TriangleMix {layers}", style, shift,
                    sorted((r for r in cells if r["layers"] == layers),
                           key=lambda r: r["context_tokens"]), "trianglemix_score")
                   for layers, style, shift in (("probed", "C0-s", 1.04), ("deep_half", "C1-^",
                                                                           0.96))]
        for label, style, shift, pts, key in series:
            if pts:
                ax.errorbar([r["context_tokens"] * shift for r in pts], [r[key] for r in pts],
                            yerr=[_score_ci(r[key], r["n_samples"], metric) for r in pts],
                            fmt=style, capsize=2, ms=4, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.minorticks_off()
        n = min(r["n_samples"] for r in cells)
        ax.set_title(f"{task} (n={n})", fontsize=9)
        if metric == "accuracy":
            ax.set_ylim(-3, 103)
            ax.axhline(20, color="grey", lw=0.8, ls=":")
            ax.set_ylabel("accuracy (%)")
        else:
            ax.set_ylabel("NLL of the last 128 tokens (nats/token)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SmolLM2-135M-Instruct fidelity, dense vs TriangleMix ({data['device']}, "
                 f"{data['commit'][:7]})", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
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
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens per forward (default: 262144 on CUDA, 16384 on CPU)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no new cell after this long (the JSON so far stays)")
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
    args.batch_tokens = args.batch_tokens or (262144 if device == "cuda" else 16384)
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
    cells = [(length, task) for length in args.lengths for task in args.tasks]
    all_configs = {"dense": None, **configs}
    rows: list[dict] = []
    t_start = time.perf_counter()
    # The next cell's prompts are built (tokenizer, CPU) while this one is scored (GPU).
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(cell_data, tokenizer, corpus, cells[0][1], cells[0][0],
                              args.samples)
        for c, (length, task) in enumerate(cells):
            if args.time_limit_s and time.perf_counter() - t_start > args.time_limit_s:
                extra["cut"] = f"time limit {args.time_limit_s} s: {len(cells) - c} cells left"
                print(extra["cut"], flush=True)
                write_results("fidelity", rows, commit=args.commit, dirty=args.dirty, out=out,
                              extra=extra)
                break
            t0 = time.perf_counter()
            prompts, answers = pending.result()
            if c + 1 < len(cells):
                pending = pool.submit(cell_data, tokenizer, corpus, cells[c + 1][1],
                                      cells[c + 1][0], args.samples)
            t_data = time.perf_counter() - t0
            pick = 1 if task == NLL_TASK else 0  # (exact, nll): accuracy or NLL
            metric = "nll" if task == NLL_TASK else "accuracy"
            scores = score_cell(model, prompts, answers, all_configs, args.batch_tokens,
                                f"{task} {length}")[pick]
            dense = scores.pop("dense")
            rows += cell_rows(task, metric, length, dense, scores)
            extra["seconds"][f"{task}/{length}"] = {"wait_data": round(t_data, 2),
                                                    "total": round(time.perf_counter() - t0, 2)}
            extra["seconds"]["elapsed"] = round(time.perf_counter() - t_start, 1)
            extra["summary"] = summarize(rows)
            print(json.dumps(rows[-2:]), flush=True)
            write_results("fidelity", rows, commit=args.commit, dirty=args.dirty, out=out,
                          extra=extra)
    print_table(rows, COLUMNS)
    if args.plot:
        print(plot(out))


if __name__ == "__main__":
    main()
