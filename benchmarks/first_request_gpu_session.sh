#!/usr/bin/env bash
# One GPU-machine call for what the first long request after ready pays over the second
# (benchmarks/RESULTS.md, "The first long prefill after ready"):
# 1. benchmarks/served_decode.py on deployments/prefill_decode_1gpu.yaml ($STARTS app starts,
#    default 2; on a GPU under 100 GB the decode pool becomes 24 GiB, as measured on an H100),
#    each start's prefill replica profiling its first two prefills (--profile-prefills
#    $OUT/profiles, disagg/prefill/profiling.py); the events the first spent most more time in
#    are printed per replica. The profiler slows both: read the diff, not the TTFTs.
# 2. benchmarks/first_prefill_gpu_session.sh (RUNS=$RUNS, default 2): cuDNN's plan per prompt
#    length against TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, in one process each.
# Run from the repo root with the .whl set carried (benchmarks/handoff_gpu_session.sh installs
# it); about 8 minutes. The machine has no .git: pass the commit in DISAGG_COMMIT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cfg=deployments/prefill_decode_1gpu.yaml
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$total_mib" -lt 100000 ]; then
  sed 's/kv_cache_gib: 40/kv_cache_gib: 24/' "$cfg" > /tmp/first_request_1gpu.yaml
  cfg=/tmp/first_request_1gpu.yaml
fi
SERVED_DECODE=1 HANDOFF=0 TESTS=0 SERVED_S=${SERVED_S:-300} OUT="$OUT" \
  SERVED_ARGS="--config $cfg --starts ${STARTS:-2} --long-idle 15,15,0 --requests 3 \
--profile-prefills $OUT/profiles" bash benchmarks/handoff_gpu_session.sh
grep -A60 "^--- prefill replica" "$OUT/served.log" | head -130
grep -h -B2 -A30 "Traceback\|Error" /tmp/ray/session_latest/logs/serve/*.log 2>/dev/null \
  | head -300 > "$OUT/serve_errors.txt"
RUNS=${RUNS:-2} OUT="$OUT" bash benchmarks/first_prefill_gpu_session.sh
