"""TritonBackend: the `triton` sparse backend of geoalign.GeoAlignFusion (same 4 methods and semantics as
geoalign.backends.torch_sparse.TorchBackend), built from the fused kernels of ``geoalign_kernels``."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from geoalign_kernels.bank import bank_accumulate
from geoalign_kernels.output import fold_output_weights, output, output_folded_op
from geoalign_kernels.routing import route_op
from geoalign_kernels.utils import acc_dtype

from ..routing import Routing


class TritonBackend:
    """Exact sparse streaming GeoAlign with Triton kernels.

    fold_output: at inference (no grad needed), use the folded W_out.W2 output GEMM (one GEMM instead of two; the
    fold is cached per weight version). With grad enabled and any parameter requiring grad the unfolded path runs.
    """

    name = "triton"

    def __init__(self, fold_output: bool = False):
        self.fold_output = fold_output
        self._fold_key = None
        self._fold = None

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router fc1 + GELU in torch, then the fused fc2 + Top-K + softmax kernel. topk_idx int64, alpha fp32."""
        hid = F.gelu(fusion.router.fc1(q))
        fc2 = fusion.router.fc2
        topk_idx, alpha = route_op(hid, fc2.weight, fc2.bias, fusion.config.top_k)
        return Routing(topk_idx.long(), alpha)

    def new_accumulator(self, fusion, q: torch.Tensor) -> torch.Tensor:
        return torch.zeros(q.shape[0], fusion.config.projector_hidden, dtype=acc_dtype(q.dtype), device=q.device)

    def accumulate(self, fusion, h_bar, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        norm = fusion.layer_norms[i]
        fc1 = fusion.projector_for(i).fc1  # shared f_phi, or layer i's own with projector="split"
        return bank_accumulate(h_bar, alpha, norm.weight, norm.bias, fc1.weight, fc1.bias, layer, tokens, slots,
                               gather_index, fusion.config.layer_norm_eps)

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        params = (fc2.weight, fc2.bias, w_out)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, h_bar) + params)
        if self.fold_output and not needs_grad:
            if not self._fold_is_current(params):
                self._fold = fold_output_weights(*params)
                self._fold_key = tuple((weakref.ref(t), t._version) for t in params)
            return output_folded_op(q, h_bar, *self._fold)
        return output(q, h_bar, *params)

    def _fold_is_current(self, params) -> bool:
        """The cached fold was made from these very tensors (weak references, so a freed weight whose memory is
        reused never matches) at their current versions (so in-place updates refold)."""
        if self._fold_key is None:
            return False
        return all(ref() is t and version == t._version for (ref, version), t in zip(self._fold_key, params))
