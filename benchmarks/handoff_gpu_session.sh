#!/usr/bin/env bash
# One GPU-machine session for the served path: the GPU test of cuda_ipc between two Serve
# replicas (TESTS=1), benchmarks/kv_handoff.py for the backends in $BACKENDS (HANDOFF=1; the
# engine-alone columns unless SKIP_ENGINE=1), benchmarks/served_decode.py (SERVED_DECODE=1, its
# options in SERVED_ARGS, e.g. "--module-loading EAGER,LAZY,EAGER").
# Run from the repo root with the .whl set carried: `EXTRA_WHEELS=orjson==3.13.0
# ../shared/tools/gpu-wheels.sh .whl` (orjson: the ingress parses bodies with it, when installed,
# as pyproject asks; ../shared/GPU.md). Logs and JSON go to $OUT.
# The machine has no .git: pass the commit in DISAGG_COMMIT (DISAGG_DIRTY=1 if dirty).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/pp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
export PYTHONPATH="/tmp/pp:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
  DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_handoff.json" \
    DISAGG_GPU_TESTS_SELECTION="-m gpu tests/deployments/test_handoff_gpu.py" \
    timeout "${TESTS_S:-200}" python3 -m pytest -m gpu tests/deployments/test_handoff_gpu.py -q \
    -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.log" | grep -v "Warning\|warn" | tail -25
fi
if [ "${HANDOFF:-1}" = 1 ]; then
  timeout "${BENCH_S:-360}" python3 -m benchmarks.kv_handoff --backends "${BACKENDS:-cuda_ipc}" \
    --runs "${RUNS:-5}" ${SKIP_ENGINE:+--skip-engine} --out "$OUT/kv_handoff.json" 2>&1 \
    | tee "$OUT/bench.log" | grep -v "WARN\|INFO\|Warning" | tail -30
fi
if [ "${SERVED_DECODE:-0}" = 1 ]; then
  timeout "${SERVED_S:-560}" python3 -m benchmarks.served_decode --out "$OUT/served_decode.json" \
    ${SERVED_ARGS:-} \
    2>&1 | tee "$OUT/served.log" | grep -v "WARN\|INFO\|Warning" | tail -12
fi
