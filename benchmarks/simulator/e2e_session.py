"""End-to-end runs that validate the simulator, on the machine that runs the app (the GPU
machine, for both setups, in one call): for each setup,

1. component calibration first (CPU: ``benchmarks.simulator.calibrate`` in a fresh process,
   one thread as a replica of ``prefill_decode.yaml`` gets; 1gpu: the committed ``ttft.json``,
   ``decode_itl.json`` and ``kv_handoff.json``), and from it the two arrival rates: 35% and 60%
   of the prefill side's capacity for the workload;
2. the app from its YAML (``prefill_decode.yaml`` with ``random:smollm2-135m`` -- the SmolLM2
   architecture with random weights, as the GGUF cannot travel -- or
   ``prefill_decode_1gpu.yaml``), a warm-up, isolated requests (concurrency 1: the serving
   overhead for the calibration), then the load generator at the two rates.

    python -m benchmarks.simulator.e2e_session --setups cpu 1gpu --out-dir $OUT

Writes ``sim_calibration_cpu.json``, ``serve_<setup>_isolated.json`` and
``serve_<setup>.json`` into ``--out-dir``; ``benchmarks.simulator.validate`` compares them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks import serve as serve_cli
from benchmarks.loadgen.workload import parse_lengths
from benchmarks.simulator import costs
from deployments.serve_env import set_process_env

SETUPS = {
    # yaml, model override, prompt lengths (above the fixed threshold of 49151ac), outputs
    "cpu": ("deployments/prefill_decode.yaml", "random:smollm2-135m", "uniform:300:700",
            "fixed:8"),
    "1gpu": ("deployments/prefill_decode_1gpu.yaml", None, "uniform:4096:16384", "fixed:16"),
}
UTILISATIONS = (0.35, 0.6)


def mean_prefill_s(calibration: costs.Calibration, prompt_len: str) -> float:
    lengths = parse_lengths(prompt_len).sample(np.random.default_rng(0), 4000)
    return float(np.mean([calibration.cost.prefill_s(int(n),
                                                     triangle_fraction=calibration.triangle_fraction)
                          for n in lengths]))


def calibrate(setup: str, out_dir: Path, commit: str | None) -> costs.Calibration:
    if setup == "1gpu":
        return costs.h200_llama8b()
    path = out_dir / "sim_calibration_cpu.json"
    cmd = [sys.executable, "-m", "benchmarks.simulator.calibrate", "--setup", "cpu",
           "--model", "random:smollm2-135m", "--threads", "1", "--out", str(path)]
    if commit:
        cmd += ["--commit", commit]
    subprocess.run(cmd, check=True, timeout=120)
    return costs.from_calibration(path, [(0, 0.0), (1, 0.0)])


def start_app(setup: str, port: int) -> str:
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    yaml_path, model, *_ = SETUPS[setup]
    args = yaml.safe_load(Path(yaml_path).read_text())["applications"][0]["args"]
    if model is not None:
        args = {**args, "model": model}
    serve.run(build_app(AppConfig.model_validate(args)), name=f"disagg-{setup}",
              route_prefix="/")
    return f"http://127.0.0.1:{port}"


def loadgen(url: str, setup: str, out: Path, extra: list[str], commit: str | None,
            device: str) -> None:
    _, _, prompt_len, output_len = SETUPS[setup]
    argv = ["--base-url", url, "--setup", setup, "--prompt-len", prompt_len,
            "--output-len", output_len, "--ignore-eos", "--no-progress", "--out", str(out),
            "--device", device, *extra]
    if commit:
        argv += ["--commit", commit]
    serve_cli.main(argv)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["cpu", "1gpu"])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--duration-s", type=float, default=35.0, help="per loaded run")
    p.add_argument("--max-requests", type=int, default=80, help="per loaded run")
    p.add_argument("--isolated", type=int, default=5, help="concurrency-1 requests")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    calibrations = {s: calibrate(s, args.out_dir, args.commit) for s in args.setups}

    import ray
    from ray import serve

    set_process_env()  # what `make serve` gives Serve (deployments/serve_env.py)
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        for setup in args.setups:
            t0 = time.perf_counter()
            device = "cpu (1 thread per replica)" if setup == "cpu" else "NVIDIA H200"
            s_bar = mean_prefill_s(calibrations[setup], SETUPS[setup][2])
            rates = [round(u / s_bar, 3) for u in UTILISATIONS]
            # Each run lasts duration_s, capped at max_requests at the higher rate.
            duration = min(args.duration_s, args.max_requests / rates[-1])
            url = start_app(setup, args.port)
            print(f"[{setup}] app ready in {time.perf_counter() - t0:.1f} s; calibrated mean "
                  f"prefill {s_bar:.3f} s -> rates {rates}", flush=True)
            loadgen(url, setup, Path(tempfile.gettempdir()) / f"serve_{setup}_warmup.json",
                    ["--num-requests", "2", "--max-concurrency", "1", "--no-requests"],
                    args.commit, device)
            loadgen(url, setup, args.out_dir / f"serve_{setup}_isolated.json",
                    ["--num-requests", str(args.isolated), "--max-concurrency", "1",
                     "--seed", "1"], args.commit, device)
            loadgen(url, setup, args.out_dir / f"serve_{setup}.json",
                    ["--request-rate", *map(str, rates), "--duration-s", f"{duration:.1f}",
                     "--seed", "2", "--goodput", "ttft:5000"], args.commit, device)
            serve.delete(f"disagg-{setup}")
            print(f"[{setup}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
