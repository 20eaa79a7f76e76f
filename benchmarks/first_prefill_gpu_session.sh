#!/usr/bin/env bash
# One GPU-machine call for the first long prefill after warm-up (benchmarks/first_prefill.py):
# $RUNS fresh processes (default 3) with CUDA_MODULE_LOADING=EAGER and $RUNS with LAZY (CUDA's
# default, the replicas'), alternating, so both see the same machine state; then,
# with PROFILE=1, one profiled lazy run. No Ray needed. Logs and JSON go to $OUT
# (first_prefill_eager_N.json, first_prefill_lazy_N.json). The served comparison is
# `SERVED_DECODE=1 HANDOFF=0 TESTS=0 bash benchmarks/handoff_gpu_session.sh`, a call of its own.
# The machine has no .git: pass the commit in DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
LENGTHS=${LENGTHS:-32768,32767,32766,65536,65535}
for i in $(seq 1 "${RUNS:-3}"); do
  for mode in eager lazy; do
    timeout "${RUN_S:-90}" python3 -m benchmarks.first_prefill --lengths "$LENGTHS" \
      --module-loading "${mode^^}" \
      --out "$OUT/first_prefill_${mode}_$i.json" \
      2>&1 | grep -v "Warn\|warn" | tail -6 | sed "s/^/$mode $i: /"
  done
done
if [ "${PROFILE:-0}" = 1 ]; then
  timeout "${RUN_S:-90}" python3 -m benchmarks.first_prefill --module-loading LAZY --profile \
    --out "$OUT/first_prefill_lazy_profile.json" > "$OUT/profile.log" 2>&1
  grep -v "Warn\|warn\|USDT\|External init" "$OUT/profile.log" | tail -50
fi
