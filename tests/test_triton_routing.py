"""The routing kernel (geoalign_kernels.routing: router logits -> Top-K ids and softmax weights, and its backward)
against torch.

Routing indices must match exactly (the kernel rounds logits to the parameter dtype as nn.Linear does).
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
from triton_helpers import DTYPES  # noqa: E402
from geoalign.routing import topk_lower_index  # noqa: E402
from geoalign_kernels.routing import route_op  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("L,M,K", [(37, 5, 2), (1, 3, 1), (20, 4, 4), (7, 1, 1), (40, 12, 3)])
def test_route_kernel(L, M, K, dtype):
    gen = torch.Generator().manual_seed(L * 100 + M * 10 + K)
    R = 24
    hid = torch.randn(L, R, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w2 = (torch.randn(M, R, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b2 = (torch.randn(M, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    idx, alpha = route_op(hid, w2, b2, K)
    logits = F.linear(hid, w2, b2)
    ref_idx = topk_lower_index(logits, K)
    ref_alpha = torch.softmax(logits.gather(1, ref_idx).to(alpha.dtype), dim=-1)
    assert idx.dtype == torch.int64 and idx.shape == (L, K)
    assert torch.equal(idx.long(), ref_idx)
    assert_close(alpha, ref_alpha, TRITON_TOL[dtype], "alpha")
    d_alpha = torch.randn(alpha.shape, generator=gen, dtype=torch.float64).to(alpha.dtype)
    got = torch.autograd.grad((alpha * d_alpha).sum(), (hid, w2, b2))
    exp = torch.autograd.grad((ref_alpha * d_alpha).sum(), (hid, w2, b2))
    for name, a, e in zip(("d_hid", "d_w2", "d_b2"), got, exp):
        if K == M == 1:  # softmax over one logit: alpha == 1, every gradient is exactly 0
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(e) == 0
        else:
            assert_close(a, e, TRITON_TOL[dtype], name)


def test_route_kernel_partial_ties():
    """Columns 1 and 3 tie for the max and 0, 2 tie below: order must be 1, 3, 0, 2 (lower index first)."""
    L, R, M = 9, 16, 5
    hid = torch.randn(L, R)
    w2 = torch.randn(M, R)
    w2[3] = w2[1]
    w2[2] = w2[0]
    b2 = torch.tensor([0.0, 50.0, 0.0, 50.0, -50.0])
    idx, alpha = route_op(hid, w2, b2, 4)
    assert torch.equal(idx.long(), topk_lower_index(F.linear(hid, w2, b2), 4))
    assert torch.equal(idx[:, :2].long(), torch.tensor([1, 3]).expand(L, 2))
    torch.testing.assert_close(alpha[:, 0], alpha[:, 1], rtol=0, atol=0)
