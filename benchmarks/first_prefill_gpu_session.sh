#!/usr/bin/env bash
# One GPU-machine call for what a new prompt length pays (benchmarks/first_prefill.py): $RUNS
# fresh processes (default 3) with torch's cuDNN attention as it is (a plan per new sequence
# length) and $RUNS with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's opt-in ragged path for
# BSHD tensors: no plan per length), alternating, so both see the same machine state. The
# lengths repeat some earlier ones: a repeated length shows what the plan cost (RESULTS.md).
# MODULE_LOADING=EAGER|LAZY sets CUDA_MODULE_LOADING for all (unset: the replicas' default);
# PROFILE=1 adds one profiled run. No Ray needed. Logs and JSON go to $OUT
# (first_prefill_plan_N.json, first_prefill_avoid_recompile_N.json). The served comparison is
# `SERVED_DECODE=1 HANDOFF=0 TESTS=0 bash benchmarks/handoff_gpu_session.sh`, a call of its own.
# The machine has no .git: pass the commit in DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
LENGTHS=${LENGTHS:-32768,32767,32766,32767,32768,65536,65535,65536}
loading=()
[ -n "${MODULE_LOADING:-}" ] && loading=(--module-loading "$MODULE_LOADING")
for i in $(seq 1 "${RUNS:-3}"); do
  for mode in plan avoid_recompile; do
    avoid=0
    [ "$mode" = avoid_recompile ] && avoid=1
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$avoid timeout "${RUN_S:-90}" python3 \
      -m benchmarks.first_prefill --lengths "$LENGTHS" "${loading[@]}" \
      --out "$OUT/first_prefill_${mode}_$i.json" \
      2>&1 | grep -v "Warn\|warn" | tail -9 | sed "s/^/$mode $i: /"
  done
done
if [ "${PROFILE:-0}" = 1 ]; then
  timeout "${RUN_S:-90}" python3 -m benchmarks.first_prefill "${loading[@]}" --profile \
    --out "$OUT/first_prefill_profile.json" > "$OUT/profile.log" 2>&1
  grep -v "Warn\|warn\|USDT\|External init" "$OUT/profile.log" | tail -50
fi
