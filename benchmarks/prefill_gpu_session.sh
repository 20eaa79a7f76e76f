#!/usr/bin/env bash
# One GPU-machine session for the prefill path. Steps (STEPS, in order):
#   tests  GPU tests of the fused prefill (fused ops, bf16 vs fp32 model, cuDNN choice, warm-up)
#   bench  benchmarks/ttft.py: warm-up check, fused-op timings, LENGTHS (targets first)
#   gap    benchmarks/bf16_reference_gap.py: bf16 vs fp32, ours and transformers
# Run from the repo root; logs and JSON go to $OUT. The machine has no .git: pass the commit in
# DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty). Tests before bench leave the Triton disk cache warm.
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-"tests bench"}
mkdir -p "$OUT" /tmp/pp
# Installed name of kernels/ is disagg_kernels (pyproject's package-dir): map it without pip.
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
TESTS=${TESTS:-"tests/models/test_fused_gpu.py"}
for step in $STEPS; do
  case $step in
    tests) DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_prefill.json" \
           DISAGG_GPU_TESTS_SELECTION="-m gpu $TESTS" \
           timeout "${TESTS_S:-130}" python3 -m pytest -m gpu $TESTS -q -p no:cacheprovider -rfE \
           2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    bench) timeout "${BENCH_S:-200}" python3 -m benchmarks.ttft \
           --lengths ${LENGTHS:-32768 131072 65536 8192} --repeats "${REPEATS:-2}" \
           ${BENCH_ARGS:-} --out "$OUT/ttft.json" 2>&1 | tee "$OUT/ttft.log" | tail -14 ;;
    gap)   timeout "${GAP_S:-60}" python3 -m benchmarks.bf16_reference_gap \
           --out "$OUT/bf16_reference_gap.json" 2>&1 | tee "$OUT/gap.log" | tail -6 ;;
  esac
done
