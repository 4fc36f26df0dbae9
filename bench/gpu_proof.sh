#!/usr/bin/env bash
# The GPU proof (issues 14, 31) from a plain checkout on the GPU machine's own image (torch, triton, transformers,
# accelerate, peft there; no network): install this package without dependencies; then, side by side, build the
# CUDA extension (csrc/) and precompile every Triton variant the proof launches into one cache that every stage
# shares (bench/proof_plan.py precompile); then run the stages of bench/gpu_proof.py into OUT (gpu_proof.json,
# gpu_proof.log, precompile.json, PNGs, tuned_configs.json). The time plan is bench/proof_plan.py's: `python -m
# bench.proof_plan show` prints it.
#
#   bash bench/gpu_proof.sh OUT [TOTAL_SECONDS] [--skip-cuda]     # default 520: one device-tool run of 540 s
#
# --skip-cuda (taken by itself when nvcc or ninja is missing) leaves the cuda backend out, at no cost in time.
# Everything this script starts dies with it: on exit, on a timeout's SIGTERM and on Ctrl-C.
set -uo pipefail
USAGE="usage: bash bench/gpu_proof.sh OUT_DIR [TOTAL_SECONDS] [--skip-cuda]"
SKIP_CUDA=0
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --skip-cuda) SKIP_CUDA=1 ;;
    -*) echo "gpu_proof: unknown option $arg; $USAGE" >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
OUT=${POSITIONAL[0]:-}
TOTAL=${POSITIONAL[1]:-520}
if [ -z "$OUT" ] || [ "${#POSITIONAL[@]}" -gt 2 ]; then echo "gpu_proof: $USAGE" >&2; exit 2; fi
if ! [[ "$TOTAL" =~ ^[0-9]+$ ]] || [ "$TOTAL" -lt 60 ]; then
  echo "gpu_proof: TOTAL_SECONDS must be a whole number of seconds >= 60, got '$TOTAL'; $USAGE" >&2; exit 2
fi
START=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/gpu_proof.log"
PY=${PYTHON:-python3}
# the traps below take every child (the csrc build, the pool, the stages) down with us
PIDS=()
cleanup() { for p in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$p" 2>/dev/null; done; }
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 129' HUP
trap cleanup EXIT
{
  echo "===== setup $(date -u +%H:%M:%S)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  # csrc/ is built below by the JIT loader (timed, logged), not by setup.py: a failed compile must not fail the install
  GEOALIGN_BUILD_CUDA=0 timeout 30 $PY -m pip install --no-deps --no-build-isolation --no-index \
    --disable-pip-version-check -e . \
    || echo "pip install -e . failed (running from the tree through PYTHONPATH)"
} >> "$LOG" 2>&1
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/geoalign_torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/geoalign_triton_cache}   # one cache for the pool and every stage
mkdir -p "$TRITON_CACHE_DIR"
if [ "$SKIP_CUDA" -eq 1 ]; then
  echo "gpu_proof: --skip-cuda: the cuda backend is skipped" | tee -a "$LOG"
elif ! { command -v nvcc && command -v ninja; } > /dev/null 2>&1; then
  SKIP_CUDA=1; echo "gpu_proof: nvcc or ninja is missing: the cuda backend is skipped (--skip-cuda)" | tee -a "$LOG"
fi
CORES=$(nproc)
BUILD_PID=""
if [ "$SKIP_CUDA" -eq 0 ]; then
  echo "===== CUDA extension build (MAX_JOBS=${MAX_JOBS:-4}, arch $TORCH_CUDA_ARCH_LIST), beside the precompile" >> "$LOG"
  # (each background job is `timeout` itself: a TERM to it reaches everything it started)
  MAX_JOBS=${MAX_JOBS:-4} GEOALIGN_CUDA_VERBOSE=1 timeout 120 $PY -c "
import sys
from geoalign_kernels.cuda.extension import extension_error
err = extension_error()
print('CUDA extension:', 'built and loaded' if err is None else err)
sys.exit(0 if err is None else 3)" > "$OUT/.csrc_build.log" 2>&1 &
  BUILD_PID=$!; PIDS+=("$BUILD_PID")
fi
WORKERS=$(( CORES > 6 ? CORES - 4 : 2 ))
echo "===== precompile ($WORKERS workers) $(date -u +%H:%M:%S)" >> "$LOG"
timeout 120 $PY -m bench.proof_plan precompile "$OUT/precompile.json" --workers "$WORKERS" >> "$LOG" 2>&1 &
PRE_PID=$!; PIDS+=("$PRE_PID")
wait "$PRE_PID" || echo "precompile failed or timed out (rc $?): the stages compile what they launch" >> "$LOG"
BUILD_RC=3
if [ -n "$BUILD_PID" ]; then wait "$BUILD_PID"; BUILD_RC=$?; cat "$OUT/.csrc_build.log" >> "$LOG"; fi
rm -f "$OUT/.csrc_build.log"
# a build killed by the timeout leaves torch's lock file behind, and every later load would wait on it forever;
# a failed build must not be retried by every stage either: the cuda backend is then reported unavailable
rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
if [ "$BUILD_RC" -ne 0 ]; then export GEOALIGN_CUDA_JIT=0; echo "CUDA extension unavailable (rc $BUILD_RC)" >> "$LOG"; fi
LEFT=$(( TOTAL - ($(date +%s) - START) ))
$PY -m bench.gpu_proof "$OUT" --total-s "$LEFT" &
STAGES_PID=$!; PIDS+=("$STAGES_PID")
wait "$STAGES_PID"
