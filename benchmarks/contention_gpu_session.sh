#!/usr/bin/env bash
# One GPU-machine call for the prefill/decode contention benchmark (benchmarks/contention.py):
# random Llama-3.1-8B on one H200, TriangleMix prefill as prefill_decode_1gpu.yaml, decode
# holding one 10K-token sequence. Process mode (two CUDA contexts, as the app's two replicas)
# is the file the simulator reads (contention.json); thread mode (two streams, one process)
# for comparison. Run from the repo root; JSON and logs go to $OUT. The machine has no .git:
# pass the commit in DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty). ~4-6 min.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels  # installed name of kernels/ (pyproject)
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
ARGS="--model random:llama-3.1-8b --device cuda --trianglemix --lengths 4096 8192 16384
      --decode-batch 1 --decode-context 10240 --repeats 5"
timeout "${PROCESS_S:-330}" python3 -m benchmarks.contention $ARGS --mode process \
  --out "$OUT/contention.json" 2>&1 | tee "$OUT/contention_process.log" | tail -8
timeout "${THREAD_S:-240}" python3 -m benchmarks.contention $ARGS --mode thread \
  --out "$OUT/contention_thread.json" 2>&1 | tee "$OUT/contention_thread.log" | tail -8
