"""The CUDA kernels of csrc/ as torch.library custom ops (namespace ``geoalign``, with fake impls, so they compose
with autograd and torch.compile): ``cuda_route``, ``cuda_route_backward``, ``cuda_bank_rows``,
``cuda_gather_layer_norm``. Each checks its arguments on
the host before the launch (the binding checks them again with TORCH_CHECK); outputs are allocated here.
"""
from __future__ import annotations

import torch

from .. import guard
from ..guard import guarded
from ..library import custom_op
from ..runtime import acc_dtype
from .extension import MAX_BANK_LAYERS, ext, on_device, require_cuda, require_float, stream_of


# ------------------------------------------------------------------------------------------------- routing
def _check_route(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"cuda_route: logits must be [L, M] with L >= 1, got {tuple(logits.shape)}")
    M = logits.shape[1]
    if not 1 <= M <= MAX_BANK_LAYERS:
        raise ValueError(f"cuda_route: the CUDA router handles 1..{MAX_BANK_LAYERS} bank layers, got M={M}")
    if not 1 <= k <= M:
        raise ValueError(f"cuda_route: need 1 <= K <= M, got K={k}, M={M}")
    require_float("logits", logits)
    require_cuda(("logits", logits))


@custom_op("geoalign::cuda_route", mutates_args=())
def cuda_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, M<=32] -> (topk_idx [L, K] int64 descending, ties -> lower index; alpha [L, K] fp32/fp64)."""
    _check_route(logits, k)
    logits = logits.contiguous()
    L = logits.shape[0]
    topk_idx = torch.empty(L, k, dtype=torch.int64, device=logits.device)
    alpha = torch.empty(L, k, dtype=acc_dtype(logits.dtype), device=logits.device)
    with on_device(logits), guarded("cuda_route", topk_idx=topk_idx, alpha=alpha) as out:
        ext().route(logits, k, out.topk_idx, out.alpha, stream_of(logits))
    return topk_idx, alpha


@cuda_route.register_fake
def _cuda_route_fake(logits, k):
    L = logits.shape[0]
    return (logits.new_empty((L, k), dtype=torch.int64),
            logits.new_empty((L, k), dtype=acc_dtype(logits.dtype)))


@custom_op("geoalign::cuda_route_backward", mutates_args=())
def cuda_route_backward(d_alpha: torch.Tensor, alpha: torch.Tensor, topk_idx: torch.Tensor, num_layers: int,
                        logits_dtype: torch.dtype) -> torch.Tensor:
    """d logits [L, M] in logits_dtype: alpha * (d_alpha - sum alpha d_alpha) at the Top-K columns, 0 elsewhere."""
    require_cuda(("d_alpha", d_alpha), ("alpha", alpha), ("topk_idx", topk_idx))
    L = alpha.shape[0]
    d_logits = torch.empty(L, num_layers, dtype=logits_dtype, device=alpha.device)
    guard.check_index_range("cuda_route_backward", "topk_idx", topk_idx, num_layers, "bank layers")
    with on_device(alpha), guarded("cuda_route_backward", d_logits=d_logits) as out:
        ext().route_backward(d_alpha.to(alpha.dtype).contiguous(), alpha.contiguous(), topk_idx.contiguous(),
                              out.d_logits, stream_of(alpha))
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
    require_cuda(("topk_idx", topk_idx))
    guard.check_index_range("cuda_bank_rows", "topk_idx", topk_idx, num_layers, "bank layers")
    topk_idx = topk_idx.to(torch.int64).contiguous()
    P, dev = topk_idx.numel(), topk_idx.device
    tokens = torch.empty(P, dtype=torch.int64, device=dev)
    slots = torch.empty(P, dtype=torch.int64, device=dev)
    counts = torch.empty(num_layers, dtype=torch.int64, device=dev)
    offsets = torch.empty(num_layers + 1, dtype=torch.int64, device=dev)
    with on_device(topk_idx), guarded("cuda_bank_rows", tokens=tokens, slots=slots, counts=counts, offsets=offsets) as out:
        ext().bank_rows(topk_idx, num_layers, out.tokens, out.slots, out.counts, out.offsets, stream_of(topk_idx))
    return tokens, slots, counts, offsets


@cuda_bank_rows.register_fake
def _cuda_bank_rows_fake(topk_idx, num_layers):
    P = topk_idx.numel()
    new = lambda n: topk_idx.new_empty((n,), dtype=torch.int64)  # noqa: E731
    return new(P), new(P), new(num_layers), new(num_layers + 1)


# ------------------------------------------------------------------------------------------------- gather + LN
def _check_ln_params(weight: torch.Tensor, bias: torch.Tensor, D: int) -> None:
    require_float("LayerNorm weight", weight)
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
    require_float("layer", layer)
    D, G, n = layer.shape[1], gather_index.shape[1], tokens.numel()
    _check_ln_params(weight, bias, D)
    require_cuda(("layer", layer), ("gather_index", gather_index), ("tokens", tokens), ("LayerNorm weight", weight))
    if layer.stride(1) != 1:
        layer = layer.contiguous()
    dev, acc = layer.device, acc_dtype(weight.dtype)
    x = torch.empty(n, G * D, dtype=weight.dtype, device=dev)
    mean = torch.empty(n * G, dtype=acc, device=dev)
    rstd = torch.empty(n * G, dtype=acc, device=dev)
    raw = torch.empty(n * G if save_raw else 0, D, dtype=layer.dtype, device=dev)
    op = "cuda_gather_layer_norm"
    guard.check_index_range(op, "tokens", tokens, gather_index.shape[0], "rows of gather_index")
    guard.check_index_range(op, "gather_index", gather_index, layer.shape[0], "rows of the layer")
    if n > 0:
        with on_device(layer), guarded(op, x=x, mean=mean, rstd=rstd, raw=raw if save_raw else None) as out:
            ext().gather_layer_norm(layer, gather_index.to(torch.int64), tokens.to(torch.int64).contiguous(),
                                     weight.contiguous(), bias.contiguous(), float(eps), False, G,
                                     out.x.view(n * G, D), out.mean, out.rstd, out.raw if save_raw else None,
                                     stream_of(layer))
    return x, mean, rstd, raw


@cuda_gather_layer_norm.register_fake
def _cuda_gather_layer_norm_fake(layer, gather_index, tokens, weight, bias, eps, save_raw):
    D, G, n = layer.shape[1], gather_index.shape[1], tokens.shape[0]
    acc = acc_dtype(weight.dtype)
    return (layer.new_empty((n, G * D), dtype=weight.dtype), layer.new_empty((n * G,), dtype=acc),
            layer.new_empty((n * G,), dtype=acc), layer.new_empty((n * G if save_raw else 0, D)))
