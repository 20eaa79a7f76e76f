#!/usr/bin/env bash
# One GPU-machine session for TriangleMix fidelity and dynamic sparsity (issue 18).
# The 93 MB SmolLM2 GGUF exceeds one call's 64 MiB carry, so it travels in two calls made back
# to back (the warm machine keeps the ignored .fid/a of the first call):
#   here, once:  benchmarks/fidelity_gpu_session.sh prepare     (.fid/a, .fid/b, .fid/whl, sha256)
#   call 1:      carry [".fid/a", ".fid/whl", ".fid/sha256"]   command: true
#   call 2:      carry [".fid/b"]   command: DISAGG_COMMIT=<sha> bash benchmarks/fidelity_gpu_session.sh
# Steps (STEPS, in order): model tests probe select density ttft fidelity. Each has a time
# limit (<STEP>_S); every JSON is written as it grows, so a step cut short still reports.
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  gguf=$(.venv/bin/python -c "from disagg.models.embedded import find_gguf; print(find_gguf())")
  mkdir -p .fid/whl && grep -qx '/.fid/' .git/info/exclude || echo /.fid/ >> .git/info/exclude
  head -c 50000000 "$gguf" > .fid/a && tail -c +50000001 "$gguf" > .fid/b
  sha256sum < "$gguf" | cut -d' ' -f1 > .fid/sha256
  # transformers reads GGUF through the gguf package (pure Python; it imports requests).
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .fid/whl \
    gguf==0.19.0 requests==2.32.3 urllib3==2.2.3 idna==3.10 certifi==2024.8.30 \
    charset-normalizer==3.4.0 accelerate==1.15.0 --python-version 3.12 --platform any 2>/dev/null ||
  .venv/bin/python -m pip download -q --no-deps -d .fid/whl gguf==0.19.0 requests urllib3 idna \
    certifi charset-normalizer accelerate
  ls -la .fid .fid/whl; exit 0
fi
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-"model tests probe select density ttft fidelity"}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fidsite \
  .fid/whl/*.whl
# The machine's own packages first; the carried ones only fill what is missing.
export PYTHONPATH="/tmp/pp:$PWD:${PYTHONPATH:+$PYTHONPATH:}/tmp/fidsite" PYTHONUNBUFFERED=1
export DISAGG_CACHE_DIR=/tmp/disagg_cache
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
log="$OUT/session.log"
for step in $STEPS; do
  echo "== $step $(date +%T)" | tee -a "$log"
  case $step in
    model) cat .fid/a .fid/b > /tmp/smollm2.gguf
           [ "$(sha256sum < /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .fid/sha256)" ] ||
             { echo "GGUF sha256 mismatch" | tee -a "$log"; exit 1; }
           timeout "${MODEL_S:-60}" python3 -c "
from pathlib import Path
from disagg.models.embedded import EMBEDDED_MODEL, build_once, convert_gguf
print(build_once(Path('$DISAGG_CACHE_DIR') / EMBEDDED_MODEL,
                 lambda tmp: convert_gguf(Path('/tmp/smollm2.gguf'), tmp)))" 2>&1 | tail -2 | tee -a "$log" ;;
    tests) DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_fidelity.json" \
           DISAGG_GPU_TESTS_SELECTION="-m gpu tests/kernels/test_dynamic_sparse_gpu.py" \
           timeout "${TESTS_S:-60}" python3 -m pytest -m gpu tests/kernels/test_dynamic_sparse_gpu.py \
           -q -p no:cacheprovider -rfE 2>&1 | tail -8 | tee -a "$log" ;;
    probe) timeout "${PROBE_S:-60}" python3 -m disagg probe-layers --num-prompts 16 \
           --prompt-tokens 2048 --out "$OUT/fidelity_probe.json" 2>&1 | tail -3 | tee -a "$log" ;;
    select) timeout "${SELECT_S:-40}" python3 -m benchmarks.dynamic_sparse select --lengths 8192 \
           --prompts 1 --out "$OUT/dynamic_sparse_select.json" 2>&1 | tail -20 | tee -a "$log" ;;
    density) timeout "${DENSITY_S:-30}" python3 -m benchmarks.dynamic_sparse density \
           --length 8192 --prompts 4 --out "$OUT/dynamic_sparse_density.json" 2>&1 | tail -3 |
           tee -a "$log" ;;
    ttft)  timeout "${TTFT_S:-90}" python3 -m benchmarks.dynamic_sparse ttft \
           --density-json "$OUT/dynamic_sparse_density.json" --out "$OUT/dynamic_sparse.json" \
           2>&1 | tail -12 | tee -a "$log" ;;
    fidelity) timeout "${FIDELITY_S:-150}" python3 -m benchmarks.fidelity --samples "${SAMPLES:-300}" \
           --probe-json "$OUT/fidelity_probe.json" --out "$OUT/fidelity.json" 2>&1 |
           grep -v '%|' | tail -30 | tee -a "$log" ;;
  esac
done
