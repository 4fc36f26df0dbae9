"""The sparse backends save about K/M of what the dense reference saves for backward."""
from __future__ import annotations

import pytest
import torch

from geoalign.memory import SavedTensorMeter
from helpers import backend_params, Shape, fast_backends, make_fusion, make_inputs


def saved_bytes(fusion, backend, q, layers, gather_index) -> int:
    with SavedTensorMeter(exclude=fusion.parameters()) as meter:
        fusion(q, layers, gather_index, backend=backend)
    return meter.bytes


def test_meter_counts_storages_once():
    x = torch.randn(100, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x * x  # saves x twice (self and other): one storage
    assert meter.bytes == x.untyped_storage().nbytes() == 4000
    del y


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_saved_for_backward_shrinks_by_k_over_m(backend):
    # a mid shape with the paper's M=12, K=2, G=4 and widths in the paper's ratios (D = D', H = 2D)
    shape = Shape(L=256, M=12, K=2, G=4, D=64, Dg=64, H=128, R=32, N=4 * 256)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gather_index = make_inputs(shape, torch.float32)
    ref = saved_bytes(fusion, "reference", q, layers, gather_index)
    fast = saved_bytes(fusion, backend, q, layers, gather_index)
    ratio = fast / ref
    K_over_M = shape.K / shape.M
    # small overhead: q, the router's activations, h_bar and F_hat on L rows, and the per-pair index lists
    assert ratio <= K_over_M + 0.03, f"{backend} saves {fast} B vs reference {ref} B: ratio {ratio:.3f}"
    assert fast > 0


def test_meter_excludes_parameters():
    lin = torch.nn.Linear(10, 20)
    x = torch.randn(5, 10, requires_grad=True)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        y = lin(x)  # saves x and the weight
    assert meter.bytes == x.untyped_storage().nbytes()
    del y
