#!/usr/bin/env bash
# The GPU machine's software stack, checked on a CPU machine before a GPU run (issue 14): the GPU image has torch
# 2.11 (CUDA 13), triton 3.6 and transformers 5.17, not the versions this repository is developed with. This makes a
# venv with those versions (about 3 GB from the package registry, once) and runs, in it:
#   1. aot_check: every Triton kernel built for sm_90 by triton 3.6 (generic and launch-specialised builds);
#   2. the CUDA extension's JIT build for sm_90 with torch 2.11's headers (needs nvcc 13 on PATH; skipped otherwise);
#   3. bench.gpu_proof --dry-run (every stage at tiny shapes on the CPU);
#   4. pytest -m "triton and not slow" under triton 3.6's interpreter.
# numpy is held below 2.4 in that venv: triton 3.6's interpreter converts 1-element arrays with int(), which newer
# numpy refuses (interpreter only; compiled kernels do not go through it).
#
#   bash bench/gpu_image_check.sh [VENV_DIR] [OUT_DIR]     # defaults /tmp/geoalign-gpu-image, /tmp/gpu-image-check
set -uo pipefail
VENV=$(realpath -m "${1:-/tmp/geoalign-gpu-image}")
OUT=$(realpath -m "${2:-/tmp/gpu-image-check}")
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
if [ ! -f "$VENV/.geoalign-installed" ]; then  # (the marker: a failed install is redone, not reused)
  python3 -m venv "$VENV" || exit 1
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "accelerate==1.15.0" peft \
    safetensors "numpy<2.4" pillow pyyaml tqdm matplotlib ninja psutil nvidia-ml-py pytest pytest-timeout \
    hypothesis pytest-benchmark pyarrow tensorboard wheel setuptools || exit 1
  touch "$VENV/.geoalign-installed"
fi
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT:$ROOT/kernels"
"$PY" -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'numpy', numpy.__version__)"
status=0
step() {  # name, command...: run, log to OUT/name.log, report
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(( $(date +%s) - t0 )) s (log $OUT/$name.log)"
  [ $rc -eq 0 ] || status=1
}
step aot_check env -u TRITON_INTERPRET "$PY" -m geoalign_kernels.aot_check 90
if command -v nvcc > /dev/null; then
  # link against the CUDA runtime of the venv's nvidia wheel when the toolkit has no libcudart.so of its own
  CUDART=$(find "$VENV" -name "libcudart.so*" | head -1)
  mkdir -p "$OUT/cudalib" && [ -n "$CUDART" ] && ln -sf "$CUDART" "$OUT/cudalib/libcudart.so"
  step cuda_extension env LIBRARY_PATH="$OUT/cudalib${LIBRARY_PATH:+:$LIBRARY_PATH}" TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS="$(nproc)" TORCH_EXTENSIONS_DIR="$OUT/torch_extensions" "$PY" -c "
import sys
from geoalign_kernels.cuda.extension import extension_error
err = extension_error()
print('CUDA extension:', 'built and loaded' if err is None else err)
sys.exit(0 if err is None else 3)"
else
  echo "cuda_extension: skipped (nvcc not found)"
fi
step gpu_proof_dry_run env TRITON_INTERPRET=1 GEOALIGN_CUDA_JIT=0 "$PY" -m bench.gpu_proof "$OUT/dry_run" --dry-run
step pytest_triton env TRITON_INTERPRET=1 "$PY" -m pytest -q -m "triton and not slow" -p no:cacheprovider tests/
exit $status
