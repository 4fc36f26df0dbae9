"""The `cuda` backend: hand-written CUDA kernels (csrc/) for the small, latency-bound parts of the routed bank, torch
matmuls for the GEMMs. Same 4 methods and semantics as :class:`geoalign.backends.torch_sparse.TorchBackend`.

CUDA kernels (csrc/*.cu, plain-C launchers in csrc/geoalign_cuda.h, bound by csrc/binding.cpp):
  routing      Top-K over M <= 32 logits per token (one W-lane group of a warp per token, W = next power of two
               >= M; ties -> lower bank index; NaN ranks first, as torch.sort) + softmax over the K kept logits in
               fp32 (fp64 for fp64 parameters); its backward dS; and the per-bank-layer row lists (counts, offsets,
               token/slot ids) as a stable, deterministic counting sort.
  gather + LN  the G patch rows of each routed pair gathered through gather_index and normalised with LN_i into
               the packed [n, G*D'] GEMM1 input in the parameter dtype (16-byte loads where aligned, a scalar path
               otherwise; per-row mean/rstd saved), the same kernel re-applied to the saved rows in backward (a
               bit-identical recompute of x for dW1 = dz^T x), and d gamma / d beta as per-block partials reduced
               on the host (no atomics).
torch:         the router's two linears, GEMM1 (+ b1, GELU, alpha-weighted index_add into the fp32 h_bar),
               GEMM2 + W_out (+ residual), and every backward GEMM.

Saved for backward per bank layer (as the torch backend): the gathered raw rows [n*G, D'] in the layer dtype, z
[n, H] in the parameter dtype, plus per-row mean/rstd [n*G] (fp32) and the token/slot lists.

The kernels are bound as torch.library custom ops in the ``geoalign`` namespace (``cuda_route``,
``cuda_route_backward``, ``cuda_bank_rows``, ``cuda_gather_layer_norm``, ``cuda_layer_norm_apply``,
``cuda_layer_norm_backward``) with fake impls, so they compose with autograd and torch.compile.

The extension is found in this order: a prebuilt ``geoalign._cuda_ops`` (setup.py's optional CUDAExtension), else a
JIT build of csrc/ with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR) when torch is a CUDA
build and a CUDA toolkit is found. GEOALIGN_CUDA_EXT=0 disables it; GEOALIGN_CUDA_JIT=0 disables only the JIT
build. Where neither works, :func:`cuda_backend_available` is False and :func:`extension_error` says why; the torch
and Triton backends are unaffected.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from geoalign_kernels import guard
from geoalign_kernels.guard import guarded
from geoalign_kernels.library import custom_op

from ..routing import BankRows, Routing, topk_lower_index
from .torch_sparse import TorchBackend, accumulator_dtype, gelu_grad

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("binding.cpp", "routing.cu", "gather_ln.cu", "ln_backward.cu")
#: the largest bank the warp-level routing kernel handles (one logit per lane); larger banks route in torch
MAX_BANK_LAYERS = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "error": None}
#: tests may set this to an object with the binding's 5 functions (e.g. a torch emulation) to exercise the Python
#: side without a GPU; its ``requires_cuda`` attribute (default True) says whether inputs must be CUDA tensors
_EXT_OVERRIDE = None


# ------------------------------------------------------------------------------------------------- the extension
def _load() -> tuple[object | None, str | None]:
    if os.environ.get("GEOALIGN_CUDA_EXT", "1") == "0":
        return None, "the CUDA extension is disabled (GEOALIGN_CUDA_EXT=0)"
    try:
        from geoalign import _cuda_ops  # built by setup.py when a CUDA toolkit and a CUDA torch were present

        return _cuda_ops, None
    except ImportError:
        pass
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU build, and no prebuilt geoalign._cuda_ops is installed; "
                      "the cuda backend needs a CUDA build of torch")
    if os.environ.get("GEOALIGN_CUDA_JIT", "1") == "0":
        return None, "no prebuilt geoalign._cuda_ops, and the JIT build is disabled (GEOALIGN_CUDA_JIT=0)"
    missing = [s for s in SOURCES if not (CSRC_DIR / s).is_file()]
    if missing:
        return None, (f"no prebuilt geoalign._cuda_ops, and the csrc/ sources for a JIT build are missing "
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
    if _EXT_OVERRIDE is not None:
        return _EXT_OVERRIDE
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


def _ext():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {_state['error']}. Use backend='torch' or 'triton'.")
    return ext


def _on(t: torch.Tensor):
    """Run a launch on t's device (the binding launches on the current device and the given stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _require_cuda(*named: tuple[str, torch.Tensor]) -> None:
    if not getattr(load_extension(), "requires_cuda", True):
        return
    for name, t in named:
        if not t.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors; {name} is on {t.device}")


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"backend='cuda': {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


# ------------------------------------------------------------------------------------------------- routing ops
def _check_route(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"cuda_route: logits must be [L, M] with L >= 1, got {tuple(logits.shape)}")
    M = logits.shape[1]
    if not 1 <= M <= MAX_BANK_LAYERS:
        raise ValueError(f"cuda_route: the CUDA router handles 1..{MAX_BANK_LAYERS} bank layers, got M={M}")
    if not 1 <= k <= M:
        raise ValueError(f"cuda_route: need 1 <= K <= M, got K={k}, M={M}")
    _require_float("logits", logits)
    _require_cuda(("logits", logits))


@custom_op("geoalign::cuda_route", mutates_args=())
def cuda_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, M<=32] -> (topk_idx [L, K] int64 descending, ties -> lower index; alpha [L, K] fp32/fp64)."""
    _check_route(logits, k)
    logits = logits.contiguous()
    L = logits.shape[0]
    topk_idx = torch.empty(L, k, dtype=torch.int64, device=logits.device)
    alpha = torch.empty(L, k, dtype=accumulator_dtype(logits.dtype), device=logits.device)
    with _on(logits), guarded("cuda_route", topk_idx=topk_idx, alpha=alpha) as out:
        _ext().route(logits, k, out.topk_idx, out.alpha, _stream(logits))
    return topk_idx, alpha


@cuda_route.register_fake
def _cuda_route_fake(logits, k):
    L = logits.shape[0]
    return (logits.new_empty((L, k), dtype=torch.int64),
            logits.new_empty((L, k), dtype=accumulator_dtype(logits.dtype)))


@custom_op("geoalign::cuda_route_backward", mutates_args=())
def cuda_route_backward(d_alpha: torch.Tensor, alpha: torch.Tensor, topk_idx: torch.Tensor, num_layers: int,
                        logits_dtype: torch.dtype) -> torch.Tensor:
    """d logits [L, M] in logits_dtype: alpha * (d_alpha - sum alpha d_alpha) at the Top-K columns, 0 elsewhere."""
    _require_cuda(("d_alpha", d_alpha), ("alpha", alpha), ("topk_idx", topk_idx))
    L = alpha.shape[0]
    d_logits = torch.empty(L, num_layers, dtype=logits_dtype, device=alpha.device)
    guard.check_index_range("cuda_route_backward", "topk_idx", topk_idx, num_layers, "bank layers")
    with _on(alpha), guarded("cuda_route_backward", d_logits=d_logits) as out:
        _ext().route_backward(d_alpha.to(alpha.dtype).contiguous(), alpha.contiguous(), topk_idx.contiguous(),
                              out.d_logits, _stream(alpha))
    return d_logits


@cuda_route_backward.register_fake
def _cuda_route_backward_fake(d_alpha, alpha, topk_idx, num_layers, logits_dtype):
    return alpha.new_empty((alpha.shape[0], num_layers), dtype=logits_dtype)


def _route_setup_context(ctx, inputs, output):
    logits, _k = inputs
    topk_idx, alpha = output
    ctx.save_for_backward(topk_idx, alpha)
    ctx.num_layers, ctx.logits_dtype = logits.shape[1], logits.dtype


def _route_autograd(ctx, _d_topk_idx, d_alpha):
    if d_alpha is None:
        return None, None
    topk_idx, alpha = ctx.saved_tensors
    return cuda_route_backward(d_alpha, alpha, topk_idx, ctx.num_layers, ctx.logits_dtype), None


cuda_route.register_autograd(_route_autograd, setup_context=_route_setup_context)


@custom_op("geoalign::cuda_bank_rows", mutates_args=())
def cuda_bank_rows(topk_idx: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(tokens [L*K], slots [L*K], counts [M], offsets [M+1]), all int64: the pairs grouped by bank layer, tokens
    ascending within a layer (the order of geoalign.routing.bank_rows). Ids outside [0, M) are dropped."""
    if topk_idx.dim() != 2 or topk_idx.numel() == 0:
        raise ValueError(f"cuda_bank_rows: topk_idx must be a non-empty [L, K], got {tuple(topk_idx.shape)}")
    if not 1 <= num_layers <= MAX_BANK_LAYERS:
        raise ValueError(f"cuda_bank_rows: handles 1..{MAX_BANK_LAYERS} bank layers, got {num_layers}")
    _require_cuda(("topk_idx", topk_idx))
    topk_idx = topk_idx.to(torch.int64).contiguous()
    P, dev = topk_idx.numel(), topk_idx.device
    tokens = torch.empty(P, dtype=torch.int64, device=dev)
    slots = torch.empty(P, dtype=torch.int64, device=dev)
    counts = torch.empty(num_layers, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_layers + 1, dtype=torch.int64, device=dev)
    with _on(topk_idx), guarded("cuda_bank_rows", tokens=tokens, slots=slots, counts=counts, offsets=offsets) as out:
        _ext().bank_rows(topk_idx, num_layers, out.tokens, out.slots, out.counts, out.offsets, _stream(topk_idx))
    return tokens, slots, counts, offsets


@cuda_bank_rows.register_fake
def _cuda_bank_rows_fake(topk_idx, num_layers):
    P = topk_idx.numel()
    new = lambda n: topk_idx.new_empty((n,), dtype=torch.int64)  # noqa: E731
    return new(P), new(P), new(num_layers), new(num_layers + 1)


def bank_rows_cuda(topk_idx: torch.Tensor, num_layers: int) -> BankRows:
    """geoalign.routing.bank_rows on the GPU: same BankRows (one device->host copy of the M+1 offsets)."""
    tokens, slots, _counts, offsets = cuda_bank_rows(topk_idx, num_layers)
    offsets = offsets.tolist()
    if offsets[-1] != topk_idx.numel():
        raise ValueError(f"topk_idx holds bank positions outside [0, {num_layers}): only {offsets[-1]} of "
                         f"{topk_idx.numel()} routed pairs were placed")
    return BankRows(tokens=tokens, slots=slots, offsets=offsets)


# ------------------------------------------------------------------------------------------------- gather + LN ops
def _ln_rows_per_block(R: int) -> int:
    """Rows summed per backward block: at most 512 row blocks (plenty for an H100's 132 SMs), at least 1 row."""
    return max(1, math.ceil(R / 512))


def _check_ln_params(weight: torch.Tensor, bias: torch.Tensor, D: int) -> None:
    _require_float("LayerNorm weight", weight)
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"LayerNorm weight/bias must be [{D}], got {tuple(weight.shape)}/{tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"LayerNorm bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")


@custom_op("geoalign::cuda_gather_layer_norm", mutates_args=())
def cuda_gather_layer_norm(layer: torch.Tensor, gather_index: torch.Tensor, tokens: torch.Tensor,
                           weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           save_raw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, G*D'] = concat_g LN(layer[gather_index[tokens, g]].to(weight.dtype)) in weight's dtype, the per-row
    mean/rstd [n*G] (fp32; fp64 for fp64 weights) and, with save_raw, the gathered rows [n*G, D'] in the layer's
    dtype (else an empty [0, D'] tensor)."""
    if layer.dim() != 2:
        raise ValueError(f"cuda_gather_layer_norm: layer must be [N, D'], got {tuple(layer.shape)}")
    if gather_index.dim() != 2 or tokens.dim() != 1:
        raise ValueError("cuda_gather_layer_norm: gather_index must be [L, G] and tokens [n]")
    if gather_index.dtype not in (torch.int64, torch.int32) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError("cuda_gather_layer_norm: gather_index and tokens must be int64 (or int32)")
    _require_float("layer", layer)
    D, G, n = layer.shape[1], gather_index.shape[1], tokens.numel()
    _check_ln_params(weight, bias, D)
    _require_cuda(("layer", layer), ("gather_index", gather_index), ("tokens", tokens), ("LayerNorm weight", weight))
    if layer.stride(1) != 1:
        layer = layer.contiguous()
    dev, acc = layer.device, accumulator_dtype(weight.dtype)
    x = torch.empty(n, G * D, dtype=weight.dtype, device=dev)
    mean = torch.empty(n * G, dtype=acc, device=dev)
    rstd = torch.empty(n * G, dtype=acc, device=dev)
    raw = torch.empty(n * G if save_raw else 0, D, dtype=layer.dtype, device=dev)
    op = "cuda_gather_layer_norm"
    guard.check_index_range(op, "tokens", tokens, gather_index.shape[0], "rows of gather_index")
    guard.check_index_range(op, "gather_index", gather_index, layer.shape[0], "rows of the layer")
    if n > 0:
        with _on(layer), guarded(op, x=x, mean=mean, rstd=rstd, raw=raw if save_raw else None) as out:
            _ext().gather_layer_norm(layer, gather_index.to(torch.int64), tokens.to(torch.int64).contiguous(),
                                     weight.contiguous(), bias.contiguous(), float(eps), False, G,
                                     out.x.view(n * G, D), out.mean, out.rstd, out.raw if save_raw else None,
                                     _stream(layer))
    return x, mean, rstd, raw


@cuda_gather_layer_norm.register_fake
def _cuda_gather_layer_norm_fake(layer, gather_index, tokens, weight, bias, eps, save_raw):
    D, G, n = layer.shape[1], gather_index.shape[1], tokens.shape[0]
    acc = accumulator_dtype(weight.dtype)
    return (layer.new_empty((n, G * D), dtype=weight.dtype), layer.new_empty((n * G,), dtype=acc),
            layer.new_empty((n * G,), dtype=acc), layer.new_empty((n * G if save_raw else 0, D)))


@custom_op("geoalign::cuda_layer_norm_apply", mutates_args=())
def cuda_layer_norm_apply(raw: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [R/G, G*D'] from saved rows raw [R, D'] and their saved mean/rstd: bit-identical to the forward's x."""
    if raw.dim() != 2 or raw.shape[0] % group_size != 0:
        raise ValueError(f"cuda_layer_norm_apply: raw must be [n*G, D'] with G={group_size}, got {tuple(raw.shape)}")
    R, D = raw.shape
    _check_ln_params(weight, bias, D)
    _require_cuda(("raw", raw))
    x = torch.empty(R // group_size, group_size * D, dtype=weight.dtype, device=raw.device)
    if R > 0:
        with _on(raw), guarded("cuda_layer_norm_apply", x=x) as out:
            _ext().gather_layer_norm(raw.contiguous(), None, None, weight.contiguous(), bias.contiguous(), 0.0, True,
                                     group_size, out.x.view(R, D), mean.contiguous(), rstd.contiguous(), None,
                                     _stream(raw))
    return x


@cuda_layer_norm_apply.register_fake
def _cuda_layer_norm_apply_fake(raw, mean, rstd, weight, bias, group_size):
    R, D = raw.shape
    return raw.new_empty((R // group_size, group_size * D), dtype=weight.dtype)


@custom_op("geoalign::cuda_layer_norm_backward", mutates_args=())
def cuda_layer_norm_backward(dx: torch.Tensor, raw: torch.Tensor, mean: torch.Tensor,
                             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gamma, d beta) [D'] in the accumulation dtype: sums over the R rows of dx * x_hat and dx, where dx is the
    LayerNorm output's gradient (any shape with R*D' elements, the parameter dtype) and x_hat is recomputed from
    the saved rows; per-block partials in the kernel, reduced here in a fixed order."""
    R, D = raw.shape
    if dx.numel() != R * D:
        raise ValueError(f"cuda_layer_norm_backward: dx has {dx.numel()} elements, expected {R}*{D}")
    _require_cuda(("dx", dx), ("raw", raw))
    acc = accumulator_dtype(dx.dtype)
    rpb = _ln_rows_per_block(R)
    blocks = math.ceil(R / rpb)
    dg = torch.empty(blocks, D, dtype=acc, device=dx.device)
    db = torch.empty(blocks, D, dtype=acc, device=dx.device)
    with _on(dx), guarded("cuda_layer_norm_backward", dg=dg, db=db) as out:
        _ext().layer_norm_backward_partials(dx.reshape(R, D).contiguous(), raw.contiguous(), mean.contiguous(),
                                            rstd.contiguous(), rpb, out.dg, out.db, _stream(dx))
    return dg.sum(0), db.sum(0)


@cuda_layer_norm_backward.register_fake
def _cuda_layer_norm_backward_fake(dx, raw, mean, rstd):
    acc = accumulator_dtype(dx.dtype)
    D = raw.shape[1]
    return dx.new_empty((D,), dtype=acc), dx.new_empty((D,), dtype=acc)


# ------------------------------------------------------------------------------------------------- the bank layer
class CudaBankAccumulate(torch.autograd.Function):
    """h_bar[t] += alpha[t, s] * GELU(W1 . x + b1) for the pairs (t, s) of one bank layer i, with x the CUDA
    gather + LN_i of their G patch rows. Updates h_bar in place (mark_dirty) and returns it. Gradients as
    geoalign.backends.torch_sparse.BankAccumulate: dW1 = dz^T x (x recomputed bit-identically from the saved rows),
    d gamma / d beta from the CUDA partials kernel, d alpha = <dh_bar, GELU(z)>; none into the frozen layer."""

    @staticmethod
    def forward(ctx, h_bar, alpha, ln_weight, ln_bias, fc1_weight, fc1_bias, layer, tokens, slots, gather_index, eps):
        ctx.mark_dirty(h_bar)
        n, G = tokens.numel(), gather_index.shape[1]
        ctx.G, ctx.empty = G, n == 0
        if n == 0:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None, None, None)
            return h_bar
        need_saved = any(ctx.needs_input_grad[1:6])
        x, mean, rstd, raw = cuda_gather_layer_norm(layer, gather_index, tokens, ln_weight, ln_bias, eps,
                                                    need_saved)
        z = F.linear(x, fc1_weight, fc1_bias)  # [n, H]
        del x
        a = alpha[tokens, slots].to(h_bar.dtype).unsqueeze(1)
        h_bar.index_add_(0, tokens, a * F.gelu(z).to(h_bar.dtype))  # tokens are distinct within a layer
        if need_saved:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, raw, mean, rstd, z)
        else:
            ctx.save_for_backward(tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, None, None, None, None)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        tokens, slots, alpha, ln_weight, ln_bias, fc1_weight, raw, mean, rstd, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        nones = (None,) * 5
        if ctx.empty:  # no pair routed to this layer: zero (not None) LayerNorm grads, as the dense bank gives
            d_ln_w = torch.zeros_like(ln_weight) if need[2] else None
            d_ln_b = torch.zeros_like(ln_bias) if need[3] else None
            return (d_h_bar, None, d_ln_w, d_ln_b, None, None) + nones
        if z is None:  # nothing but h_bar needed a gradient in forward
            return (d_h_bar, None, None, None, None, None) + nones
        d_alpha = d_ln_w = d_ln_b = d_w1 = d_b1 = None
        acc, dtype = d_h_bar.dtype, fc1_weight.dtype
        dh = d_h_bar[tokens]  # [n, H]
        z_acc = z.to(acc)
        if need[1]:  # d alpha_{t,s} = <d h_bar_t, GELU(z_{t,s})>
            d_alpha = torch.zeros_like(alpha)
            d_alpha[tokens, slots] = (dh * F.gelu(z_acc)).sum(1).to(alpha.dtype)
        if any(need[2:6]):
            a = alpha[tokens, slots].to(acc).unsqueeze(1)
            dz = (a * dh * gelu_grad(z_acc)).to(dtype)  # [n, H]
            if need[4]:
                x = cuda_layer_norm_apply(raw, mean, rstd, ln_weight, ln_bias, ctx.G)
                d_w1 = dz.t() @ x
                del x
            if need[5]:
                d_b1 = dz.to(acc).sum(0).to(dtype)
            if need[2] or need[3]:
                dx = dz @ fc1_weight  # [n, G*D'] in the parameter dtype; no gradient into the frozen layer
                d_gamma, d_beta = cuda_layer_norm_backward(dx, raw, mean, rstd)
                d_ln_w = d_gamma.to(dtype) if need[2] else None
                d_ln_b = d_beta.to(dtype) if need[3] else None
        return (d_h_bar, d_alpha, d_ln_w, d_ln_b, d_w1, d_b1) + nones


# ------------------------------------------------------------------------------------------------- the backend
class CudaBackend(TorchBackend):
    """Exact sparse streaming GeoAlign with the csrc/ CUDA kernels for routing and gather + LayerNorm, torch for
    the GEMMs. Stateless: the fusion module holds the parameters. The accumulator and the output stage are the
    torch backend's (inherited).

    bank_rows(topk_idx, M) is the CUDA counterpart of geoalign.routing.bank_rows (same BankRows), for a
    FusionStream that asks its backend for the row lists.

    fold_output: as TorchBackend's (the output GEMMs are torch's)."""

    name = "cuda"

    def __init__(self, fold_output: bool = False):
        _ext()  # a clear error now rather than at the first launch
        super().__init__(fold_output=fold_output)

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP in torch, then the CUDA Top-K + softmax (banks of more than 32 layers route in torch)."""
        _require_cuda(("q", q))
        logits = fusion.router.fc2(F.gelu(fusion.router.fc1(q)))
        k = fusion.config.top_k
        if logits.shape[1] > MAX_BANK_LAYERS:
            topk_idx = topk_lower_index(logits, k)
            alpha = torch.softmax(logits.gather(1, topk_idx).to(accumulator_dtype(q.dtype)), dim=-1)
            return Routing(topk_idx, alpha)
        topk_idx, alpha = cuda_route(logits, k)
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        if num_layers > MAX_BANK_LAYERS:
            from ..routing import bank_rows

            return bank_rows(topk_idx, num_layers)
        return bank_rows_cuda(topk_idx, num_layers)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return CudaBankAccumulate.apply(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer,
                                        tokens, slots, gather_index, fusion.config.layer_norm_eps)
