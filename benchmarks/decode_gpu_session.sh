#!/usr/bin/env bash
# One GPU-machine session for decode: the GPU tests of the paged decode kernel and the CUDA-graph
# decode step, then the decode ITL benchmark (with the kernel sweep and transformers' baseline).
# Run from the repo root; logs and JSON go to $OUT. The machine has no .git: pass the commit in
# DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty). No pip install: torch, triton, transformers are there.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
# Installed name of kernels/ is disagg_kernels (pyproject's package-dir): map it without pip.
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
TESTS=${TESTS:-"tests/kernels/test_paged_decode_gpu.py tests/decode/test_decode_graphs_gpu.py"}
DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_decode.json" DISAGG_GPU_TESTS_SELECTION="-m gpu $TESTS" \
  timeout "${TESTS_S:-100}" python3 -m pytest -m gpu $TESTS -q -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_S:-230}" python3 -m benchmarks.decode_itl ${BENCH_ARGS:-} \
  --budget-s "${TRANSFORMERS_BUDGET_S:-130}" --out "$OUT/decode_itl.json" \
  --sweep-out "$OUT/decode_kernel_sweep.json" 2>&1 | tee "$OUT/bench.log" \
  | grep -v "Warning\|warn(" | tail -45
