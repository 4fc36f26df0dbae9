"""Finding and loading the compiled CUDA kernels of csrc/ (the flash-attention split: csrc/ validates with TORCH_CHECK,
this loader and the thin op registrations in ops.py are the interface; geoalign.backends.cuda_backend adapts them).

CUDA kernels (csrc/*.cu, plain-C launchers in csrc/geoalign_cuda.h, bound by csrc/binding.cpp; the binding
validates every argument with TORCH_CHECK):
  routing      Top-K over M <= 32 logits per token (one W-lane group of a warp per token, W = next power of two
               >= M; the Top-K policy of geoalign.routing: ties -> lower bank index, NaN first) + softmax over the K
               kept logits in fp32 (fp64 for fp64 parameters); its backward dS; and the per-bank-layer row lists
               (counts, offsets, token/slot ids) as a stable, deterministic counting sort.
  gather + LN  the G patch rows of each routed pair gathered through gather_index and normalised (the backend
               passes a unit affine: x_hat, the operand it saves for backward) into a packed [n, G*D'] matrix
               (16-byte loads where aligned, a scalar path otherwise).

The extension is found in this order: a prebuilt ``geoalign_kernels._cuda_ops`` (setup.py's optional CUDAExtension), else a
JIT build of csrc/ with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR) when torch is a CUDA
build and a CUDA toolkit is found. GEOALIGN_CUDA_EXT=0 disables it; GEOALIGN_CUDA_JIT=0 disables only the JIT
build. Where neither works, :func:`cuda_backend_available` is False and :func:`extension_error` says why.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch
from ..checks import FLOAT_DTYPES

CSRC_DIR = Path(__file__).resolve().parents[3] / "csrc"   # kernels/geoalign_kernels/cuda/ -> the repository
SOURCES = ("binding.cpp", "routing.cu", "gather_ln.cu")
#: the largest bank the warp-level routing kernel handles (one logit per lane); larger banks route in torch
MAX_BANK_LAYERS = 32

_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "error": None}
#: tests may set this to an object with the binding's 5 functions (e.g. a torch emulation) to exercise the Python
#: side without a GPU; its ``requires_cuda`` attribute (default True) says whether inputs must be CUDA tensors
EXT_OVERRIDE = None


def _load() -> tuple[object | None, str | None]:
    if os.environ.get("GEOALIGN_CUDA_EXT", "1") == "0":
        return None, "the CUDA extension is disabled (GEOALIGN_CUDA_EXT=0)"
    try:
        from geoalign_kernels import _cuda_ops  # built by setup.py when a CUDA toolkit and a CUDA torch were present

        return _cuda_ops, None
    except ImportError:
        pass
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU build, and no prebuilt geoalign_kernels._cuda_ops is installed; "
                      "the cuda backend needs a CUDA build of torch")
    if os.environ.get("GEOALIGN_CUDA_JIT", "1") == "0":
        return None, "no prebuilt geoalign_kernels._cuda_ops, and the JIT build is disabled (GEOALIGN_CUDA_JIT=0)"
    missing = [s for s in SOURCES if not (CSRC_DIR / s).is_file()]
    if missing:
        return None, (f"no prebuilt geoalign_kernels._cuda_ops, and the csrc/ sources for a JIT build are missing "
                      f"({missing} under {CSRC_DIR}); install from the repository or build with setup.py")
    try:
        from torch.utils.cpp_extension import CUDA_HOME, load
    except Exception as exc:  # pragma: no cover - torch without cpp_extension
        return None, f"torch.utils.cpp_extension is unavailable: {exc}"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found for the JIT build (set CUDA_HOME to one with nvcc)"
    try:
        ext = load(name="geoalign_cuda_ops", sources=[str(CSRC_DIR / s) for s in SOURCES],
                   extra_include_paths=[str(CSRC_DIR)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                   verbose=os.environ.get("GEOALIGN_CUDA_VERBOSE", "0") == "1")
    except Exception as exc:
        return None, f"JIT build of {CSRC_DIR} failed: {type(exc).__name__}: {exc}"
    return ext, None


def load_extension():
    """The compiled kernel module, or None when it cannot be had here (see :func:`extension_error`). Cached."""
    if EXT_OVERRIDE is not None:
        return EXT_OVERRIDE
    with _lock:
        if not _state["tried"]:
            _state["ext"], _state["error"] = _load()
            _state["tried"] = True
    return _state["ext"]


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    return None if load_extension() is not None else _state["error"]


def cuda_backend_available() -> bool:
    """True when backend='cuda' can run here: a CUDA device and the compiled kernels."""
    return torch.cuda.is_available() and load_extension() is not None


def ext():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {_state['error']}. Use backend='torch' or 'triton'.")
    return ext


def on_device(t: torch.Tensor):
    """Run a launch on t's device (the binding launches on the current device and the given stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def require_cuda(*named: tuple[str, torch.Tensor]) -> None:
    if not getattr(load_extension(), "requires_cuda", True):
        return
    for name, t in named:
        if not t.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors; {name} is on {t.device}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"backend='cuda': {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
