#!/usr/bin/env bash
# One GPU-machine session for the Triangle kernel: GPU tests, optional tile sweep, benchmark.
# Run from the repo root; logs and JSON go to $OUT (default ./gpu_out). The machine has no .git:
# pass the commit in DISAGG_COMMIT (and DISAGG_DIRTY=1 for an uncommitted tree).
#   STEPS="tests sweep bench" bash benchmarks/kernels/triangle_gpu_session.sh
# After a sweep in the same call, bench times the sweep's pick (fastest at the largest sweep
# length only), not the tile table: run bench alone to time the table.
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-"tests bench"}
mkdir -p "$OUT" /tmp/pp
# Installed name of kernels/ is disagg_kernels (pyproject's package-dir): map it without pip.
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
for step in $STEPS; do
  case $step in
    tests) DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests.json" DISAGG_GPU_TESTS_SELECTION="-m gpu tests/kernels" \
           timeout "${TESTS_S:-200}" python3 -m pytest -m gpu tests/kernels -q -p no:cacheprovider \
           2>&1 | tee "$OUT/tests.log" | tail -30 ;;
    sweep) timeout "${SWEEP_S:-200}" python3 -m benchmarks.kernels.triangle_attention --sweep \
           --out "$OUT/triangle_attention_sweep.json" --best-out "$OUT/best_config.json" \
           2>&1 | tee "$OUT/sweep.log" | tail -16 ;;
    bench) best=(); [ -f "$OUT/best_config.json" ] && best=(--config "$OUT/best_config.json")
           timeout "${BENCH_S:-240}" python3 -m benchmarks.kernels.triangle_attention "${best[@]}" \
           --out "$OUT/triangle_attention.json" 2>&1 | tee "$OUT/bench.log" | tail -12 ;;
    ptxas) python3 benchmarks/kernels/triangle_resources.py 2>&1 | tee "$OUT/resources.log" | tail -8 ;;
  esac
done
