#!/usr/bin/env bash
# One GPU-machine session for the engine and the serving layer: the GPU tests of the prefill
# path (TriangleMix wired into the model), then the serving-overhead benchmark.
# Run from the repo root with ray's wheels installed (../shared/GPU.md); logs and JSON go to
# $OUT. The machine has no .git: pass the commit in DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
# Installed name of kernels/ is disagg_kernels (pyproject's package-dir): map it without pip.
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_prefill.json" DISAGG_GPU_TESTS_SELECTION="-m gpu tests/prefill" \
  timeout "${TESTS_S:-150}" python3 -m pytest -m gpu tests/prefill -q -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -15
timeout "${BENCH_S:-330}" python3 -m benchmarks.serving_overhead --requests "${REQUESTS:-10}" \
  --max-tokens 16 --out "$OUT/serving_overhead.json" 2>&1 | tee "$OUT/serving.log" \
  | grep -v "WARN\|INFO" | tail -15
