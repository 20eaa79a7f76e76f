"""The fidelity tasks through the served API: what users get from ``make serve``.

    python -m deployments.launch <yaml with trianglemix.enabled: false, routing.mode: remote>
    python -m benchmarks.fidelity_served --label dense --url http://127.0.0.1:8000
    (relaunch with trianglemix.enabled: true)
    python -m benchmarks.fidelity_served --label trianglemix --url http://127.0.0.1:8000
    python -m benchmarks.fidelity_served --combine     # rows with source "served" + agreement
    python -m benchmarks.fidelity_served --merge       # those rows into results/fidelity.json

The same prompts as ``benchmarks.fidelity`` (same generator, seed, lengths), sent as token ids
to ``/v1/completions`` (greedy, ``max_tokens`` = the answer's length); a sample is correct iff
the completion starts with the reference answer. ``routing.mode: remote`` makes every prompt
take the prefill server (the path TriangleMix runs on; decode's local prefill is dense).
``--combine`` scores the same samples in-process (``disagg.fidelity.scoring``, teacher-forced,
on this machine) and writes both, with the per-sample agreement, to
``benchmarks/results/fidelity_served.json``. ``--merge`` puts its served rows into
``fidelity.json`` (the issue's one results file; ``layers`` = the shipped default set, and each
row names its ``device``), replacing served rows merged before.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from benchmarks.fidelity import cell_rows
from disagg.attention.triangle import published_trianglemix
from disagg.fidelity.scoring import score_configs
from disagg.fidelity.tasks import TASKS, generate_task
from disagg.models.loader import load_model, load_tokenizer, resolve_model

PARTS = RESULTS_DIR / "fidelity_served_parts"


def _samples(tokenizer, args):
    return {task: generate_task(tokenizer, task, args.length, args.samples) for task in args.tasks}


def run_served(args, tokenizer) -> None:
    import httpx

    outcomes = {}
    with httpx.Client(base_url=args.url, timeout=600) as client:
        for task, samples in _samples(tokenizer, args).items():
            hits = []
            for s in samples:
                body = {"model": args.model, "prompt": s.prompt_ids, "temperature": 0.0,
                        "max_tokens": len(s.answer_ids)}
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                text = r.json()["choices"][0]["text"]
                hits.append(100.0 * text.strip().startswith(s.answer_text.strip()))
            outcomes[task] = hits
            print(task, args.label, sum(hits) / len(hits), flush=True)
    PARTS.mkdir(parents=True, exist_ok=True)
    (PARTS / f"{args.label}.json").write_text(json.dumps(
        {"length": args.length, "samples": args.samples, "outcomes": outcomes}))


def run_combine(args, tokenizer, source) -> None:
    served = {label: json.loads((PARTS / f"{label}.json").read_text())
              for label in ("dense", "trianglemix")}
    model = load_model(source)
    config = published_trianglemix("smollm2-135m")
    rows, agreement = [], {}
    for task, samples in _samples(tokenizer, args).items():
        prompts = torch.tensor([s.prompt_ids for s in samples])
        answers = [s.answer_ids for s in samples]
        scored = score_configs(model, prompts, answers, {"dense": None, "trianglemix": config})
        engine = {label: [100.0 * e for e in s.exact] for label, s in scored.items()}
        for r in cell_rows(task, "accuracy", args.length, served["dense"]["outcomes"][task],
                           {"default": served["trianglemix"]["outcomes"][task]}):
            rows.append({**r, "source": "served"})
        for r in cell_rows(task, "accuracy", args.length, engine["dense"],
                           {"default": engine["trianglemix"]}):
            rows.append({**r, "source": "engine"})
        agreement[task] = {label: sum(a == b for a, b in zip(engine[label],
                                                              served[label]["outcomes"][task]))
                           / len(samples) for label in engine}
    write_results("fidelity_served", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                  extra={"per_sample_agreement": agreement, "layers": list(config.triangle_layers),
                         "device": "cpu (served and in-process)"})
    print_table(rows, ["task", "source", "n_samples", "dense_score", "trianglemix_score"])
    print(json.dumps(agreement))


def merge(served_path: Path, fidelity_path: Path) -> int:
    """Copy the served rows of ``served_path`` into ``fidelity_path``; returns how many."""
    served = json.loads(served_path.read_text())
    fidelity = json.loads(fidelity_path.read_text())
    rows = [{**r, "layers": fidelity["default_layers"], "device": served["device"],
             "commit": served["commit"]} for r in served["rows"] if r["source"] == "served"]
    fidelity["rows"] = [r for r in fidelity["rows"] if r.get("source") != "served"] + rows
    fidelity["served_rows_from"] = served_path.name
    fidelity_path.write_text(json.dumps(fidelity, indent=2) + "\n")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--label", choices=["dense", "trianglemix"], default=None)
    parser.add_argument("--combine", action="store_true")
    parser.add_argument("--merge", action="store_true", help="served rows into fidelity.json")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.merge:
        n = merge(args.out or RESULTS_DIR / "fidelity_served.json", RESULTS_DIR / "fidelity.json")
        print(f"{n} served rows merged into {RESULTS_DIR / 'fidelity.json'}")
        return
    from disagg.cli import default_cache_dir

    source = resolve_model(args.model, cache_dir=args.cache_dir or default_cache_dir())
    tokenizer = load_tokenizer(source)
    if args.combine:
        run_combine(args, tokenizer, source)
    elif args.label:
        run_served(args, tokenizer)
    else:
        parser.error("give --label, --combine or --merge")


if __name__ == "__main__":
    main()
