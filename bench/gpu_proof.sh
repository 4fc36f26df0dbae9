#!/usr/bin/env bash
# The GPU proof (issue 14) from a plain checkout on the GPU machine's own image (torch, triton, transformers,
# accelerate, peft there; no network): install this package without dependencies, build the CUDA extension with
# ninja on every core, then run the stages of bench/gpu_proof.py into OUT (gpu_proof.json, gpu_proof.log, PNGs).
#
#   bash bench/gpu_proof.sh OUT [TOTAL_SECONDS]      # default 520: one device-tool run of 540 s
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_proof.sh OUT_DIR [TOTAL_SECONDS]}
TOTAL=${2:-520}
START=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/gpu_proof.log"
PY=${PYTHON:-python3}
{
  echo "===== setup $(date -u +%H:%M:%S)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  # csrc/ is built below by the JIT loader (timed, logged), not by setup.py: a failed compile must not fail the install
  GEOALIGN_BUILD_CUDA=0 timeout 120 $PY -m pip install --no-deps --no-build-isolation -e . \
    || echo "pip install -e . failed (running from the tree through PYTHONPATH)"
} >> "$LOG" 2>&1
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/geoalign_torch_extensions}
{
  echo "===== CUDA extension build (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST) $(date -u +%H:%M:%S)"
  GEOALIGN_CUDA_VERBOSE=1 timeout 240 $PY -c "
import sys
from geoalign_kernels.cuda.extension import extension_error
err = extension_error()
print('CUDA extension:', 'built and loaded' if err is None else err)
sys.exit(0 if err is None else 3)"
} >> "$LOG" 2>&1
BUILD_RC=$?
# a build killed by the timeout leaves torch's lock file behind, and every later load would wait on it forever;
# a failed build must not be retried by every stage either: the cuda backend is then reported unavailable
rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
if [ "$BUILD_RC" -ne 0 ]; then export GEOALIGN_CUDA_JIT=0; echo "CUDA extension unavailable (rc $BUILD_RC)" >> "$LOG"; fi
LEFT=$(( TOTAL - ($(date +%s) - START) ))
$PY -m bench.gpu_proof "$OUT" --total-s "$LEFT"
