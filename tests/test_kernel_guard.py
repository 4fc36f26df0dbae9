"""Guard mode (geoalign_kernels.guard, GEOALIGN_GUARD=1) and the launchers' bounds.

- A kernel that stores one element outside its buffer (before, after, or into a strided buffer's gaps) raises
  GuardError naming the launch, the buffer and the offset; a correct kernel passes and its result is written back.
- Out-of-range ids handed to a launcher raise GuardError in guard mode; with those host checks off, the kernels'
  own bounds keep every store inside its buffer (the canaries stay intact) and the damage is visible as NaN.
The whole Triton suite runs in guard mode (tests/conftest.py); test_guard_is_on_in_the_suite checks that.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton

import triton.language as tl  # noqa: E402

from geoalign_kernels import guard  # noqa: E402
from geoalign_kernels.bank import bank_layer_forward  # noqa: E402
from geoalign_kernels.guard import GuardError, guarded  # noqa: E402


@triton.jit
def _store_range_kernel(out_ptr, start, count, stride, BLOCK: tl.constexpr):
    """out[(start + i) * stride] = i + 1 for i < count: a store window that may be shifted outside the buffer."""
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + (start + offs) * stride, (offs + 1).to(tl.float32), mask=offs < count)


def launch(out: torch.Tensor, start: int, count: int, stride: int = 1) -> None:
    with guarded("test_store", out=out) as w:
        _store_range_kernel[(1,)](w.out, start, count, stride, BLOCK=32)


@pytest.fixture
def guard_on(monkeypatch):
    monkeypatch.setattr(guard, "ENABLED", True)


def test_guard_is_on_in_the_suite():
    assert guard.ENABLED, "tests/conftest.py sets GEOALIGN_GUARD=1 before geoalign_kernels is imported"


def test_in_bounds_store_passes_and_is_written_back(guard_on):
    out = torch.zeros(10)
    launch(out, 0, 10)
    assert out.tolist() == [float(i + 1) for i in range(10)]


@pytest.mark.parametrize("start,count,where", [(1, 10, "after its end"), (-1, 3, "before its first element"),
                                               (9, 2, "after its end")])
def test_store_outside_the_buffer_is_caught(guard_on, start, count, where):
    out = torch.zeros(10)
    with pytest.raises(GuardError, match=rf"test_store wrote 1 element\(s\) outside out \(shape \[10\].*{where}"):
        launch(out, start, count)


def test_store_into_the_gaps_of_a_strided_buffer_is_caught(guard_on):
    base = torch.zeros(6, 8)
    column = base[:, 0]  # 6 elements, stride 8: the 7 elements between two of them are not the buffer's
    launch(column, 0, 6, stride=8)  # every element of the view: fine
    assert column.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with pytest.raises(GuardError, match="stride gaps"):
        launch(column, 0, 6, stride=4)  # half of these land between the view's elements


def test_guard_off_costs_nothing():
    """Off, guarded() hands the kernel the caller's own tensors."""
    out = torch.zeros(4)
    was = guard.ENABLED
    try:
        guard.ENABLED = False
        with guarded("x", out=out) as w:
            assert w.out is out
    finally:
        guard.ENABLED = was


# --------------------------------------------------------------------------------------------- launcher bounds
def bank_args(L=6, K=2, G=4, Dg=8, H=16, N=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(h_bar=torch.zeros(L, H), alpha=torch.rand(L, K, generator=gen), ln_weight=1 + r(Dg),
                ln_bias=r(Dg), fc1_weight=r(H, G * Dg) / 4, fc1_bias=r(H), layer=r(N, Dg),
                tokens=torch.arange(L), slots=torch.zeros(L, dtype=torch.int64), offsets=torch.tensor([0, L]),
                layer_pos=0, gather_index=torch.randint(0, N, (L, G), generator=gen), eps=1e-5,
                x_hat=torch.zeros(0, G * Dg), x=torch.zeros(L, G * Dg), affine=torch.zeros(2, 0, Dg), tape=False)


@pytest.mark.parametrize("field,value,message", [
    ("tokens", torch.tensor([0, 1, 2, 3, 4, 6]), r"tokens must lie in \[0, 6\) \(rows of h_bar\), got values in \[0, 6\]"),
    ("tokens", torch.tensor([0, -1, 2, 3, 4, 5]), r"tokens must lie in \[0, 6\)"),
    ("slots", torch.tensor([0, 0, 2, 0, 0, 0]), r"slots must lie in \[0, 2\) \(columns of alpha\)"),
    ("gather_index", torch.full((6, 4), 30), r"gather_index must lie in \[0, 30\) \(rows of the layer\)"),
    ("offsets", torch.tensor([0, 7]), r"offsets must lie in \[0, 7\) \(pair positions\), got values in \[0, 7\]"),
])
def test_out_of_range_ids_are_caught_in_guard_mode(guard_on, field, value, message):
    args = bank_args()
    args[field] = value
    with pytest.raises(GuardError, match=message):
        bank_layer_forward(**args)


def test_out_of_range_ids_are_caught_in_guard_mode_with_a_tape(guard_on):
    """The training path: x_hat and x at the pairs' tape rows and the stacked affine, then GEMM1 over every pair."""
    from geoalign_kernels.bank import bank_tape_forward

    args = bank_args()
    args.update(x_hat=torch.zeros(6, 32), affine=torch.zeros(2, 1, 8), tape=True,
                tokens=torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(GuardError, match=r"tokens must lie in \[0, 6\)"):
        bank_layer_forward(**args)
    with pytest.raises(GuardError, match=r"positions must lie in \[0, 6\) \(tape rows\), got values in \[0, 6\]"):
        bank_tape_forward(torch.zeros(6, 16), torch.rand(6, 1), torch.randn(16, 32), torch.zeros(16),
                          torch.tensor([0, 1, 2, 3, 4, 6]), torch.zeros(6, 32), torch.zeros(6, 16))


def test_kernels_bound_out_of_range_ids_themselves(guard_on, monkeypatch):
    """With guard mode's host index checks switched off but its canaries on: a token id past h_bar, a slot past
    alpha and a gather row past the layer write nothing outside any buffer; the pair with the bad gather row turns
    its token's h_bar row NaN (visible), the pairs with bad token/slot ids add nothing, the rest is exact."""
    monkeypatch.setattr(guard, "check_index_range", lambda *a, **k: None)
    good = bank_args()
    h_good = good["h_bar"]
    bank_layer_forward(**good)
    bad = bank_args()
    bad["tokens"] = torch.tensor([0, 1, 2, 3, 4, 9])  # pair 5: token 9 of 6
    bad["slots"] = torch.tensor([0, 0, 0, 5, 0, 0])  # pair 3: slot 5 of 2
    bad["gather_index"][2, 1] = 10**6  # pair 2: a row far past the layer's 30
    bank_layer_forward(**bad)  # the canaries around h_bar and x must hold
    h_bad = bad["h_bar"]
    assert torch.equal(h_bad[[0, 1, 4]], h_good[[0, 1, 4]])
    assert h_bad[2].isnan().all()
    assert torch.equal(h_bad[3], torch.zeros_like(h_bad[3])) and torch.equal(h_bad[5], torch.zeros_like(h_bad[5]))
