#!/usr/bin/env bash
# One GPU-machine session for TriangleMix fidelity and dynamic sparsity (issue 18).
# The 98 MB SmolLM2 GGUF exceeds one call's 64 MiB carry, so it travels in two calls made back
# to back (the warm machine keeps the ignored .fid/a of the first call):
#   here, once:  benchmarks/fidelity_gpu_session.sh prepare   (.fid/a, .fid/b, .fid/whl, sha256)
#   call 1:      carry [".fid/a", ".fid/whl", ".fid/sha256"]   command: ls -l .fid
#   call 2:      carry [".fid/b"]
#                command: DISAGG_COMMIT=<sha> bash benchmarks/fidelity_gpu_session.sh
# Steps (STEPS, in order): model probe density select ttft fidelity (tests: the kernel's GPU
# tests, passed at 7513cdb; add it to STEPS to rerun them). Each step runs under its own limit
# (<STEP>_S) and under what is left of SESSION_S; every JSON is written as it grows, so a step
# cut short still reports. Every step's whole stdout and stderr go to $OUT/session.log (which
# comes back); the terminal gets each step's status line and, for a failed step, the log's end.
# The model step converts the GGUF into $DISAGG_CACHE_DIR/smollm2-135m-instruct (the directory
# disagg.models.loader.resolve_model loads) and stops the session's SmolLM2 steps if that
# directory does not load. CPU rehearsal (what was run here):
#   OUT=/tmp/fidrun PY=.venv/bin/python DISAGG_CACHE_DIR=$(mktemp -d) DEVICE=cpu SAMPLES=3 \
#   LENGTHS="1024" PROBE_PROMPTS=2 PROBE_TOKENS=1024 DENSITY_LENGTH=1024 SELECT_LENGTH=1024 \
#   STEPS="model probe density select fidelity" bash benchmarks/fidelity_gpu_session.sh
set -uo pipefail
PY=${PY:-python3}
if [ "${1:-}" = prepare ]; then
  gguf=$("$PY" -c "from disagg.models.embedded import find_gguf; print(find_gguf())") || exit 1
  mkdir -p .fid/whl
  grep -qx '/.fid/' .git/info/exclude || echo /.fid/ >> .git/info/exclude
  head -c 50000000 "$gguf" > .fid/a && tail -c +50000001 "$gguf" > .fid/b
  sha256sum < "$gguf" | cut -d' ' -f1 > .fid/sha256
  # transformers reads GGUF through the gguf package (pure Python), the one package the GPU
  # image lacks (its deps numpy, pyyaml, requests, tqdm are there).
  rm -f .fid/whl/*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .fid/whl gguf==0.19.0 || exit 1
  ls -la .fid .fid/whl; exit 0
fi
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-"model probe density select ttft fidelity"}
SESSION_S=${SESSION_S:-560}
DEVICE_ARG=${DEVICE:+--device $DEVICE}
mkdir -p "$OUT" /tmp/pp
log="$OUT/session.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
for part in .fid/a .fid/b .fid/sha256; do
  [ -f "$part" ] || { say "FATAL: $part missing (call 1 carries .fid/a .fid/whl .fid/sha256, \
call 2 right after it .fid/b; if the machine went cold between them, make both again)"; exit 1; }
done
ln -sfn "$PWD/kernels" /tmp/pp/disagg_kernels
rm -rf /tmp/fidsite
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fidsite \
  .fid/whl/*.whl >> "$log" 2>&1 || { say "FATAL: installing .fid/whl failed (see session.log)"; exit 1; }
# PYTHONPATH precedes site-packages: /tmp/fidsite holds only gguf, which the image lacks.
export PYTHONPATH="/tmp/pp:$PWD:${PYTHONPATH:+$PYTHONPATH:}/tmp/fidsite" PYTHONUNBUFFERED=1
export DISAGG_CACHE_DIR=${DISAGG_CACHE_DIR:-/tmp/disagg_cache} TQDM_MININTERVAL=5
{ nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 || true
  "$PY" -c "import sys, torch, transformers, gguf, tokenizers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers',
      transformers.__version__, 'tokenizers', tokenizers.__version__, 'gguf from', gguf.__file__)"
} 2>&1 | tee -a "$log"
declare -A status
t_session=$SECONDS
# run_step NAME LIMIT CMD...: the command under min(LIMIT, what is left of SESSION_S), its whole
# output into the log; a failure prints the log's tail here too.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$((SESSION_S - (SECONDS - t_session)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then say "== $name SKIPPED: session time used up"; status[$name]=skipped; return 1; fi
  say "== $name start $(date +%T) limit ${limit}s: $*"
  local t0=$SECONDS mark
  mark=$(wc -l < "$log")
  timeout -k 10 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v '^ *$' >> "$log"
  local rc=${PIPESTATUS[0]}
  status[$name]="rc=$rc $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then
    local end
    end=$(tail -n +"$((mark + 1))" "$log" | grep -v '%|' | tail -25)
    say "== $name FAILED rc=$rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (time limit)'); its output's end:"
    echo "$end"
  else
    say "== $name ok $((SECONDS - t0))s"
  fi
  return "$rc"
}
model_ok=1
[ -f "$DISAGG_CACHE_DIR/smollm2-135m-instruct/config.json" ] || model_ok=0
probe_json="$OUT/fidelity_probe.json"
for step in $STEPS; do
  case $step in
    model)
      cat .fid/a .fid/b > /tmp/smollm2.gguf
      if [ "$(sha256sum < /tmp/smollm2.gguf | cut -d' ' -f1)" != "$(cat .fid/sha256)" ]; then
        say "== model FAILED: GGUF sha256 mismatch"; status[model]=sha_mismatch; continue
      fi
      run_step model "${MODEL_S:-150}" "$PY" -c "
from pathlib import Path
from disagg.models.embedded import EMBEDDED_MODEL, build_once, convert_gguf
from disagg.models.loader import load_model, load_tokenizer, resolve_model
cache = Path('$DISAGG_CACHE_DIR')
print('built', build_once(cache / EMBEDDED_MODEL,
                          lambda tmp: convert_gguf(Path('/tmp/smollm2.gguf'), tmp)))
source = resolve_model(EMBEDDED_MODEL, cache_dir=cache)  # what every later step does
model, tok = load_model(source), load_tokenizer(source)
print('loads:', source.path, sorted(p.name for p in source.path.iterdir()),
      model.config.num_layers, 'layers', len(tok), 'tokens')" &&
        [ -f "$DISAGG_CACHE_DIR/smollm2-135m-instruct/config.json" ] && model_ok=1 ;;
    tests)
      export DISAGG_GPU_TESTS_JSON="$OUT/gpu_tests_fidelity.json" \
        DISAGG_GPU_TESTS_SELECTION="-m gpu tests/kernels/test_dynamic_sparse_gpu.py"
      run_step tests "${TESTS_S:-60}" "$PY" -m pytest -m gpu tests/kernels/test_dynamic_sparse_gpu.py \
        -q -p no:cacheprovider -rfE ;;
    ttft)
      density_json="$OUT/dynamic_sparse_density.json"
      [ -s "$density_json" ] || { density_json=benchmarks/results/dynamic_sparse_density.json
        say "== ttft: no density from this session, the measured one from $density_json"; }
      run_step ttft "${TTFT_S:-120}" "$PY" -m benchmarks.dynamic_sparse ttft \
        --density-json "$density_json" --densities ${TTFT_DENSITIES:-0.2 0.35 0.5} \
        --out "$OUT/dynamic_sparse.json" ;;
    probe|density|select|fidelity)
      if [ "$model_ok" != 1 ]; then say "== $step SKIPPED: no SmolLM2 model directory"; status[$step]=skipped; continue; fi
      case $step in
        probe) run_step probe "${PROBE_S:-90}" "$PY" -m disagg probe-layers $DEVICE_ARG \
                 --num-prompts "${PROBE_PROMPTS:-16}" --prompt-tokens "${PROBE_TOKENS:-2048}" \
                 --out "$probe_json" ;;
        density) run_step density "${DENSITY_S:-45}" "$PY" -m benchmarks.dynamic_sparse density \
                   $DEVICE_ARG --length "${DENSITY_LENGTH:-8192}" --prompts "${DENSITY_PROMPTS:-4}" \
                   --out "$OUT/dynamic_sparse_density.json" ;;
        select) run_step select "${SELECT_S:-60}" "$PY" -m benchmarks.dynamic_sparse select \
                  $DEVICE_ARG --lengths ${SELECT_LENGTH:-8192} --prompts "${SELECT_PROMPTS:-1}" \
                  --out "$OUT/dynamic_sparse_select.json" ;;
        fidelity)
          [ -s "$probe_json" ] || { probe_json=benchmarks/results/fidelity_probe.json
            say "== fidelity: no probe from this session, probed set from $probe_json"; }
          limit=${FIDELITY_S:-300} left=$((SESSION_S - (SECONDS - t_session)))
          [ "$left" -lt "$limit" ] && limit=$left
          run_step fidelity "$limit" "$PY" -m benchmarks.fidelity $DEVICE_ARG \
            --samples "${SAMPLES:-300}" --lengths ${LENGTHS:-8192 4096 2048} \
            --time-limit-s "$((limit - ${FIDELITY_CELL_S:-30}))" --probe-json "$probe_json" \
            --out "$OUT/fidelity.json" --plot ;;
      esac ;;
    *) say "== unknown step $step"; status[$step]=unknown ;;
  esac
done
say "== summary after $((SECONDS - t_session))s:"
for step in $STEPS; do say "   $step: ${status[$step]:-not run}"; done
ls -la "$OUT" | tee -a "$log"
