"""Parity with the reference where the default suite's settings would hide a bug.

1. Every numeric option of GeoAlignConfig away from its default: layer_norm_eps far from 1e-5, bank layer ids that
   are not 0..M-1 (and out of order), single_layer at a bank position other than its id, a derived uniform bank.
   Each test also checks that the option matters at all (the output moves when it changes), so a backend that
   ignored it could not pass.
2. Values near the ends of the float ranges: router logits of +-1e4 (exp overflows above ~88: a softmax without the
   max subtraction gives inf/NaN), and bank rows with a large common offset (a one-pass E[x^2] - E[x]^2 LayerNorm
   variance cancels catastrophically there; the two-pass/Welford forms do not). Every backend computes alpha in fp32
   (fp64 for fp64 parameters) from the logits rounded to the parameter dtype, so for fp16/bf16 routers the fp32
   case is the one where exp can overflow; their rounding is covered by the dtype tolerances of the parity suite.
3. Grad modes: inference mode, a bf16 autocast.
4. Partial gradients: only some of the bank's inputs train (the others frozen), and the torch backend's grouped
   bank_backward called alone: what it returns for each combination of needed gradients, at what precision, on
   which device.
Backends: torch, triton (interpreter), and cuda with its kernels emulated in torch (the real CUDA kernels are run
on these cases by test_cuda_kernels.py on a GPU).
"""
from __future__ import annotations

import itertools

import pytest
import torch


from geoalign.backends.torch_sparse import pair_grads
from bank_backward_helpers import BANK_GRADS, NEEDS, bank_backward_fp64, call_bank_backward, taped_bank
from cuda_helpers import run_cuda_backend
from helpers import (TOL, Shape, assert_parity, backend_params, fast_backends, make_fusion, make_inputs, rel_err,
                     run_backend)

BACKENDS = fast_backends() + ["cuda-emulated"]


def run(fusion, backend, q, layers, gather_index, grad_out):
    if backend == "cuda-emulated":
        return run_cuda_backend(fusion, q, layers, gather_index, grad_out)
    return run_backend(fusion, backend, q, layers, gather_index, grad_out)


def parity(shape, dtype, backend, tol, fusion_options=None, prepare=None, layers_fn=None, seed=0):
    """Reference vs backend on one case; returns (reference result, fusion, inputs) for extra checks."""
    fusion = make_fusion(shape, dtype, seed=seed, **(fusion_options or {}))
    if prepare is not None:
        prepare(fusion)
    q, layers, gather_index = make_inputs(shape, dtype, seed=seed + 1)
    if layers_fn is not None:
        layers = layers_fn(layers)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    ref = run_backend(fusion, "reference", q, layers, gather_index, grad_out)
    fast = run(fusion, backend, q, layers, gather_index, grad_out)
    assert_parity(fast, ref, tol, f"{backend}/{dtype}")
    return ref, fusion, (q, layers, gather_index)


# ----------------------------------------------------------------------------------------- 1. non-default options
SCATTERED = (9, 2, 14, 5)  # bank layer ids in bank order: position != id, not sorted


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("eps", [0.37, 3.0])
def test_layer_norm_eps_is_honoured(emulated, backend, eps):
    shape = Shape(L=13, M=4, K=2, G=4)
    ref, fusion, (q, layers, gi) = parity(shape, torch.float64, backend, TOL[torch.float64],
                                          fusion_options=dict(layer_norm_eps=eps))
    # the option matters: the default eps gives a clearly different output
    with torch.no_grad():
        for ln in fusion.layer_norms:
            ln.eps = 1e-5
        fusion.config.layer_norm_eps = 1e-5
        default = fusion(q.detach(), layers, gi, backend="reference")
    assert rel_err(default, ref[0]) > 1e-3


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_scattered_bank_layer_ids(emulated, backend):
    shape = Shape(L=15, M=4, K=2, G=4)
    options = dict(bank_layers=SCATTERED)
    fusion = make_fusion(shape, torch.float64, **options)
    assert fusion.config.bank_layers == SCATTERED
    parity(shape, torch.float64, backend, TOL[torch.float64], fusion_options=options)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_single_layer_is_a_bank_position_lookup(emulated, backend):
    """feature_usage='single' with single_layer=14: bank position 2, not 14 and not 0."""
    shape = Shape(L=11, M=4, K=1, G=4)
    options = dict(bank_layers=SCATTERED, feature_usage="single", single_layer=14)
    ref, _fusion, _inputs = parity(shape, torch.float64, backend, TOL[torch.float64], fusion_options=options)
    assert ref[1].topk_idx.unique().tolist() == [2]


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_derived_uniform_bank(emulated, backend):
    """bank_selection='uniform' with bank_size=3 over geo_depth=8: layers (1, 4, 7)... as the config derives them;
    the fast paths read the same resolved bank."""
    shape = Shape(L=9, M=3, K=2, G=4)
    config = shape.config()
    options = dict(bank_layers=None, bank_selection="uniform", bank_size=3, geo_depth=8)
    fusion = make_fusion(shape, torch.float64, **options)
    assert fusion.config.bank_layers != config.bank_layers and len(fusion.config.bank_layers) == 3
    parity(shape, torch.float64, backend, TOL[torch.float64], fusion_options=options)


# ------------------------------------------------------------------------------------------------- 2. ranges
def huge_logits(fusion):
    """Router logits near +-1e4 with O(1) gaps between the top ones: only a max-subtracted softmax survives."""
    with torch.no_grad():
        fc2 = fusion.router.fc2
        fc2.weight.mul_(0.25)
        M = fc2.bias.shape[0]
        fc2.bias.copy_(torch.tensor([1e4 - 0.7 * j if j % 2 == 0 else -1e4 - j for j in range(M)],
                                    dtype=fc2.bias.dtype))


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_router_logits_near_the_exp_overflow(emulated, backend, dtype):
    shape = Shape(L=12, M=6, K=3, G=4)
    ref, fusion, (q, _layers, _gi) = parity(shape, dtype, backend, TOL[dtype], prepare=huge_logits)
    alpha = ref[1].alpha
    assert torch.isfinite(alpha).all() and alpha.min() > 1e-3  # non-trivial weights: the gaps are O(1)
    logits = fusion.router(q.detach()).abs()
    assert logits.min() > 5e3  # every logit is far past exp's overflow


def separate_logits(fusion):
    """Router logits about 1 apart between layers: no fp32-vs-fp64 near-tie can flip a route."""
    with torch.no_grad():
        fusion.router.fc2.weight.mul_(0.1)
        fusion.router.fc2.bias.copy_(torch.arange(fusion.router.fc2.bias.shape[0], dtype=torch.float32) * -1.0)


def offset_rows(layers):
    """Bank rows with a common offset of 3e3 and unit spread: LayerNorm must not cancel catastrophically."""
    return [x * 0.5 + 3e3 for x in layers]


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_layer_norm_of_rows_with_a_large_offset(emulated, backend):
    """fp32 rows 3e3 + N(0, 0.25): a one-pass variance E[x^2] - E[x]^2 loses ~all digits (E[x^2] ~ 1e7, ulp ~1);
    two-pass / Welford statistics keep ~1e-4. Checked against the fp64 reference on the same fp32 inputs."""
    shape = Shape(L=10, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    separate_logits(fusion)
    q, layers, gi = make_inputs(shape, torch.float32)
    layers = offset_rows(layers)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    fast = run(fusion, backend, q, layers, gi, grad_out)
    f64 = make_fusion(shape, torch.float32)
    separate_logits(f64)
    f64 = f64.double()
    q64 = q.detach().double().requires_grad_(True)
    ref = run_backend(f64, "reference", q64, [x.double() for x in layers], gi, grad_out.double())
    assert torch.equal(fast[1].topk_idx, ref[1].topk_idx)
    # seen: output <= 1.5e-4, gradients <= 6.5e-4 (the fp32 rounding of 3e3-sized inputs and of their mean); a
    # one-pass variance is off by O(1) here
    assert rel_err(fast[0], ref[0]) <= 1e-3, rel_err(fast[0], ref[0])
    for name, g in fast[3].items():
        assert rel_err(g, ref[3][name]) <= 5e-3, (name, rel_err(g, ref[3][name]))


# ----------------------------------------------------------------------------------------- 3. grad modes
@pytest.mark.parametrize("backend", backend_params(fast_backends()))
@pytest.mark.parametrize("fold_output", [False, True])
def test_inference_mode(backend, fold_output):
    """Under torch.inference_mode (what evaluation and generate run) with inference tensors as inputs: inference
    tensors have no version counter, so nothing may read one; the output equals the reference's."""
    shape = Shape(L=9, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gi = make_inputs(shape, torch.float32)
    with torch.no_grad():
        expected = fusion(q, layers, gi, backend="reference")
    with torch.inference_mode():
        q_i, layers_i, gi_i = q.clone(), [x.clone() for x in layers], gi.clone()
        assert q_i.is_inference()
        out = fusion(q_i, layers_i, gi_i, backend=backend, fold_output=fold_output)
    assert out.is_inference()
    assert rel_err(out, expected) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backend_params(fast_backends()))
def test_bf16_autocast(backend):
    """Under a bf16 autocast with fp32 parameters (what training with precision="bf16" runs): the router's hidden
    layer comes out bf16 while its fc2 stays fp32. Every backend runs forward and backward, and agrees with its
    own fp32 run within bf16's rounding (a few 2^-8 through the chain)."""
    shape = Shape(L=11, M=3, K=2, G=4)
    fusion = make_fusion(shape, torch.float32)
    q, layers, gi = make_inputs(shape, torch.float32)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    expected = run_backend(fusion, backend, q, layers, gi, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_backend(fusion, backend, q, layers, gi, grad_out)
    assert torch.equal(got[1].topk_idx, expected[1].topk_idx)
    assert rel_err(got[0].float(), expected[0]) < 5e-2
    assert rel_err(got[2].float(), expected[2]) < 5e-2
    for name, g in expected[3].items():
        if g is not None:
            assert rel_err(got[3][name].float(), g) < 1e-1, name


# ----------------------------------------------------------------------------------------- 4. partial gradients
#: which of the bank's differentiable inputs train (name prefixes); the others are frozen. fc2, out_proj and q train.
TRAINABLE = {
    "router": ("router.",),  # only alpha needs a gradient: the bank's backward needs no dz at all
    "fc1_weight": ("projector.fc1.weight",),
    "fc1_bias": ("projector.fc1.bias",),
    "layer_norms": ("layer_norms.",),
}


@pytest.mark.parametrize("backend", ["torch", "cuda-emulated"])
@pytest.mark.parametrize("trainable", list(TRAINABLE))
def test_partly_frozen_bank(emulated, backend, trainable):
    """Of the router, fc1.weight, fc1.bias and the LayerNorms only one group trains: each trainable parameter gets
    the reference's gradient (fp64 tolerance), each frozen one none."""
    shape = Shape(L=13, M=5, K=2, G=4)
    fusion = make_fusion(shape, torch.float64)
    for name, p in fusion.named_parameters():
        in_bank = name.startswith(("router.", "projector.fc1.", "layer_norms."))
        p.requires_grad_(not in_bank or name.startswith(TRAINABLE[trainable]))
    q, layers, gi = make_inputs(shape, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = run_backend(fusion, "reference", q, layers, gi, grad_out)
    fast = run(fusion, backend, q, layers, gi, grad_out)
    tol = TOL[torch.float64]
    assert rel_err(fast[0], ref[0]) <= tol and rel_err(fast[2], ref[2]) <= tol
    for name, p in fusion.named_parameters():
        if p.requires_grad:
            assert rel_err(fast[3][name], ref[3][name]) <= tol, name
        else:
            assert fast[3][name] is None, name


def test_bank_backward_returns_only_what_is_needed():
    """bank_backward for each of the 16 combinations of need_* flags, on a bf16 tape: None for every gradient not
    needed; each needed one bit for bit the all-needed call's, d_alpha in alpha's dtype (fp32) and the rest in the
    parameter dtype (bf16). pair_grads likewise returns d_alpha only when needed, dz only when needed."""
    shape = Shape(L=13, M=5, K=2, G=4)
    bank, d_h_bar = taped_bank(shape, torch.bfloat16)
    full = call_bank_backward(bank, d_h_bar)
    shapes = [(shape.L, shape.K), (shape.H, shape.G * shape.Dg), (shape.H,), (shape.M, shape.Dg), (shape.M, shape.Dg)]
    assert [tuple(g.shape) for g in full] == shapes
    for flags in itertools.product([False, True], repeat=len(NEEDS)):
        need = dict(zip(NEEDS, flags))
        got = call_bank_backward(bank, d_h_bar, **need)
        wanted = [need["need_alpha"], need["need_w1"], need["need_b1"], need["need_ln"], need["need_ln"]]
        for name, g, f, w in zip(BANK_GRADS, got, full, wanted):
            if not w:
                assert g is None, (need, name)
                continue
            assert g.dtype == (torch.float32 if name == "alpha" else torch.bfloat16), (need, name)
            assert torch.equal(g, f), (need, name)
    tokens, slots = bank.rows.tokens, bank.rows.slots
    for need_alpha, need_params in itertools.product([False, True], repeat=2):
        d_a, dz = pair_grads(d_h_bar[tokens], bank.alpha[tokens, slots], bank.tape[-1], need_alpha, need_params,
                             torch.bfloat16)
        assert (d_a is not None) == need_alpha and (dz is not None) == need_params


def ulps(got: torch.Tensor, exact: torch.Tensor, bits: int) -> float:
    """max |got - exact| in units of the last place of ``exact`` in a float format of ``bits`` significant bits."""
    _, e = torch.frexp(exact)
    return ((got.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), e - bits)).max().item()


def test_bank_backward_accumulates_in_fp32():
    """GELU and GELU' are evaluated, and sums taken, in fp32 whatever the tape's dtype; one rounding to the parameter
    dtype at the end. Against fp64 on the same tape:
    - fp32 parameters under a bf16 autocast (the tape's z is bf16): every gradient within 1e-5 (seen <= 2.2e-7:
      fp32 rounding over sums of <= n*H terms); GELU' taken in bf16 is off by ~2^-9 (seen >= 1.4e-3).
    - bf16 parameters: d_alpha (alpha's dtype, fp32) within 1e-5 likewise. d_fc1_bias and d_ln_bias are sums of dz,
      which the backward rounds to bf16 (its GEMM operand): within 1 bf16 ulp of the fp64 sums of those bf16 dz,
      i.e. summed in fp32 and rounded once (seen 0.5 ulp; rounding each layer's sum of dz to bf16: >= 6 ulps)."""
    shape = Shape(L=37, M=12, K=2, G=4, D=28, Dg=18, H=44, R=10)
    bank, d_h_bar = taped_bank(shape, torch.float32, autocast=torch.bfloat16)
    assert bank.tape[-1].dtype == torch.bfloat16 and bank.fc1_weight.dtype == torch.float32
    for name, got, exact in zip(BANK_GRADS, call_bank_backward(bank, d_h_bar), bank_backward_fp64(bank, d_h_bar)):
        assert got.dtype == torch.float32 and rel_err(got, exact) <= 1e-5, (name, rel_err(got, exact))

    bank, d_h_bar = taped_bank(shape, torch.bfloat16)
    d_alpha, _d_w1, d_b1, _d_gamma, d_beta = call_bank_backward(bank, d_h_bar)
    assert d_alpha.dtype == torch.float32
    assert rel_err(d_alpha, bank_backward_fp64(bank, d_h_bar)[0]) <= 1e-5
    exact_b1, exact_beta = bank_backward_fp64(bank, d_h_bar, round_dz=torch.bfloat16)
    assert ulps(d_b1, exact_b1, bits=8) <= 1.0 and ulps(d_beta, exact_beta, bits=8) <= 1.0, (
        ulps(d_b1, exact_b1, bits=8), ulps(d_beta, exact_beta, bits=8))


def test_bank_backward_allocates_on_the_gradient_device():
    """Every gradient is made on d_h_bar's device, not the default one: checked on the meta device (a non-CPU device
    on every machine; shapes and dtypes only), so a CPU-only run sees what a CUDA run would."""
    bank, d_h_bar = taped_bank(Shape(L=13, M=5, K=2, G=4), torch.float32)
    for name, g in zip(BANK_GRADS, call_bank_backward(bank, d_h_bar, to=lambda t: t.to("meta"))):
        assert g.device.type == "meta", name
