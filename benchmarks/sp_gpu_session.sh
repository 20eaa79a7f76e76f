#!/usr/bin/env bash
# One GPU-machine session for sequence-parallel prefill (issue 11), one H200:
#   bench  benchmarks/sequence_parallel.py: per-rank work at LENGTHS for SP 2 4 8, projected TTFT
#   tests  GPU tests of the SP path (cuDNN log-sum-exp pieces; an SP group as threads on one GPU)
# Run from the repo root; logs and JSON go to $OUT. Pass the commit in DISAGG_COMMIT.
# Measured multi-GPU run (two-GPU issue), one command on a machine with N GPUs:
#   python3 -m benchmarks.sequence_parallel --measured --sp N --lengths 32768 131072
set -uo pipefail
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-"bench tests"}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels  # installed name of kernels/ (pyproject)
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
for step in $STEPS; do
  case $step in
    bench) timeout "${BENCH_S:-165}" python3 -m benchmarks.sequence_parallel \
           --lengths ${LENGTHS:-32768 131072} --sp ${SP:-2 4 8} --out "$OUT/sequence_parallel.json" \
           2>&1 | tee "$OUT/bench.log" | tail -30 ;;
    tests) DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_sp.json" \
           DISAGG_GPU_TESTS_SELECTION="-m gpu tests/prefill/test_sequence_parallel_gpu.py" \
           timeout "${TESTS_S:-60}" python3 -m pytest -m gpu tests/prefill/test_sequence_parallel_gpu.py \
           -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
  esac
done
