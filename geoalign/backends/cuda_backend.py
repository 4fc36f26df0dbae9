"""The `cuda` backend: hand-written CUDA kernels (csrc/; geoalign_kernels.cuda loads and registers them) for the small, latency-bound parts
of the routed bank, torch for the GEMMs: the router's linears, GEMM1 and its epilogue (per layer at inference; once
for every layer in training, as the torch backend does), the output stage (inherited from the base protocol) and
every backward GEMM.

The tape is the torch backend's: per bank layer the normalised gathered rows x_hat [n_j, G, D'], and z [L*K, H] in
pair order, in the parameter dtype (TorchBackend.layer_tape).
"""
from __future__ import annotations

import torch

from geoalign_kernels.cuda.extension import MAX_BANK_LAYERS, ext, require_cuda
from geoalign_kernels.cuda.ops import cuda_bank_rows, cuda_gather_layer_norm, cuda_route

from ..routing import BankRows, Routing
from .torch_sparse import TorchBackend


def bank_rows_cuda(topk_idx: torch.Tensor, num_layers: int) -> BankRows:
    """geoalign.routing.bank_rows on the GPU: the same BankRows, built by one counting-sort launch with no
    device->host copy (the routers only emit positions in [0, M); guard mode checks that)."""
    tokens, slots, _counts, offsets = cuda_bank_rows(topk_idx, num_layers)
    return BankRows(tokens=tokens, slots=slots, offsets=offsets)


# ------------------------------------------------------------------------------------------------- the backend
class CudaBackend(TorchBackend):
    """Exact sparse streaming GeoAlign with the csrc/ CUDA kernels for routing, row lists and the gather +
    normalisation of each bank layer's rows; the rest (GEMM1 and its epilogue, the bank's backward, the output
    stage) is the torch backend's."""

    name = "cuda"

    def __init__(self, fold_output: bool = False):
        ext()  # a clear error now rather than at the first launch
        super().__init__(fold_output=fold_output)

    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP in torch, then the CUDA Top-K + softmax (banks of more than 32 layers route in torch)."""
        require_cuda(("q", q))
        if fusion.config.num_bank_layers > MAX_BANK_LAYERS:
            return super().route(fusion, q)
        topk_idx, alpha = cuda_route(fusion.router(q), fusion.config.top_k)
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        if num_layers > MAX_BANK_LAYERS:
            return super().bank_rows(topk_idx, num_layers)
        return bank_rows_cuda(topk_idx, num_layers)

    def normalized_rows(self, layer, gather_index, tokens, eps, dtype) -> torch.Tensor:
        """x_hat [n, G, D'] by the CUDA gather + LayerNorm kernel with a unit affine (gamma, beta are applied in
        GEMM1's operand, as in the torch backend)."""
        n, G, Dg = tokens.numel(), gather_index.shape[1], layer.shape[1]
        unit = torch.ones(Dg, dtype=dtype, device=layer.device), torch.zeros(Dg, dtype=dtype, device=layer.device)
        x_hat, _mean, _rstd, _raw = cuda_gather_layer_norm(layer, gather_index, tokens, *unit, eps, False)
        return x_hat.reshape(n, G, Dg)
