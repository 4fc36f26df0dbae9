"""The output stage (geoalign_kernels.output: Q_hat = q + W_out (W2 h_bar + b2), and its W_out.W2-folded inference
form) against torch, called alone and through the Triton backend.

Conventions shared by every tests/test_triton_*.py (interpreter shapes, error metric, tolerances, poisoned outputs):
tests/triton_helpers.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poison_outputs")]

from helpers import TRITON_TOL, assert_close  # noqa: E402
from triton_helpers import DTYPES, fusion_case  # noqa: E402
from geoalign.routing import bank_rows  # noqa: E402
from geoalign.backends.triton_backend import TritonBackend  # noqa: E402
from geoalign_kernels.output import fold_output_weights, output as triton_output, output_folded_op  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_parity_and_folded(dtype):
    gen = torch.Generator().manual_seed(13)
    L, D, H = 37, 40, 48

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    q = rnd(L, D).requires_grad_()
    h_bar = torch.randn(L, H, generator=gen).requires_grad_()
    w2, b2, w_out = rnd(D, H, scale=H ** -0.5), rnd(D, scale=0.3), rnd(D, D, scale=D ** -0.5)
    for p in (w2, b2, w_out):
        p.requires_grad_()
    inputs = (q, h_bar, w2, b2, w_out)
    g = rnd(L, D)
    exp = q + F.linear(F.linear(h_bar.to(dtype), w2, b2), w_out)
    got = triton_output(q, h_bar, w2, b2, w_out)
    assert_close(got, exp, TRITON_TOL[dtype], "q_hat")
    exp_g = torch.autograd.grad((exp * g).sum(), inputs)
    got_g = torch.autograd.grad((got * g).sum(), inputs)
    for name, a, e in zip(("dq", "d_h_bar", "d_w2", "d_b2", "d_w_out"), got_g, exp_g):
        assert a.dtype == e.dtype, name
        assert_close(a, e, TRITON_TOL[dtype], name)
    with torch.no_grad():  # folded W_out.W2 (inference only): one more rounding of W_f to the parameter dtype
        folded = output_folded_op(q, h_bar, *fold_output_weights(w2, b2, w_out))
    assert_close(folded, exp.detach(), TRITON_TOL[dtype], "q_hat folded")


def test_backend_fold_output_flag():
    dtype = torch.float32
    fusion, q, layers, gather_index = fusion_case(dtype, L=10, D=24, Dg=16, H=24, M=2, K=1, G=4, seed=17)
    backend = TritonBackend(fold_output=True)
    with torch.no_grad():
        routing = backend.route(fusion, q)
        rows = bank_rows(routing.topk_idx, 2)
        bank = backend.open_bank(fusion, routing.alpha, gather_index, rows, range(2), fusion.projector.fc1)
        for i in range(2):
            backend.add_layer(bank, i, layers[i])
        h_bar = backend.close_bank(bank)
        folded = backend.output(fusion, q, h_bar)
        assert backend._fold is not None
        expected = fusion(q, layers, gather_index, backend="torch")
    assert_close(folded, expected, TRITON_TOL[dtype], "q_hat folded")
    # with grad enabled the unfolded (differentiable) path is used
    out = backend.output(fusion, q, h_bar)
    assert out.requires_grad
