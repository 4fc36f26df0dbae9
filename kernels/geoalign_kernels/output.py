"""Output stage on L rows: F_hat = W2 h_bar + b2 (projector.fc2), Q_hat = Q + W_out F_hat (out_proj + residual).

Two launches of the shared GEMM kernel (gemm.py): the first has b2 in its epilogue, the second the residual Q.
Forward saves F_hat [L, D] (parameter dtype) and reads h_bar [L, H] (fp32) for dW2. Backward (custom op, same GEMM
kernel, four launches): dF = dQ_hat W_out, dW_out = dQ_hat^T F_hat, dW2 = dF^T h_bar with db2 = sum_l dF as its
A-row sums, dh_bar = dF W2, dQ = dQ_hat.

Folded inference path (``output_folded``, no autograd, only valid without grad): W_f = W_out W2 [D, H] and
b_f = W_out b2, then Q_hat = Q + h_bar W_f^T + b_f in one GEMM (fold costs one D x D x H GEMM; cache it).
"""
from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, check_tensor
from .gemm import matmul
from .library import custom_op
from .runtime import acc_dtype
from .utils import alloc


def _check_output_args(op, q, h_bar, w_h, b_h, w_out=None):
    """q [L, D], h_bar [L, H] (accumulation dtype), w_h [D, H], b_h [D] (None: not an input), w_out [D, D]; one
    parameter dtype."""
    check_tensor(op, "q", q, shape=(None, None), dtype=FLOAT_DTYPES)
    (L, D), dtype, dev = q.shape, q.dtype, q.device
    check_tensor(op, "h_bar", h_bar, shape=(L, None), dtype=acc_dtype(dtype), device=dev)
    H = h_bar.shape[1]
    check_tensor(op, "W2" if w_out is not None else "w_fold", w_h, shape=(D, H), dtype=dtype, device=dev)
    if b_h is not None:
        check_tensor(op, "b2" if w_out is not None else "b_fold", b_h, shape=(D,), dtype=dtype, device=dev)
    if w_out is not None:
        check_tensor(op, "W_out", w_out, shape=(D, D), dtype=dtype, device=dev)


def output_forward(q, h_bar, fc2_weight, fc2_bias, out_weight):
    """q [L, D], h_bar [L, H] fp32/fp64, fc2_weight [D, H], fc2_bias [D], out_weight [D, D] -> (q_hat, f_hat) [L, D]."""
    _check_output_args("output_forward", q, h_bar, fc2_weight, fc2_bias, out_weight)
    dtype = q.dtype
    f_hat = matmul(h_bar, fc2_weight.t(), bias=fc2_bias.contiguous(), out_dtype=dtype, op_dtype=dtype,
                   site="fc2")
    q_hat = matmul(f_hat, out_weight.t(), residual=q, out_dtype=dtype, op_dtype=dtype, site="out_proj")
    return q_hat, f_hat


def output_backward(d_q_hat, d_f_hat, h_bar, f_hat, fc2_weight, out_weight):
    """-> (d_h_bar [L, H] fp32/fp64, d_fc2_weight [D, H], d_fc2_bias [D], d_out_weight [D, D])."""
    op = "output_backward"
    _check_output_args(op, f_hat, h_bar, fc2_weight, None, out_weight)
    check_tensor(op, "d_q_hat", d_q_hat, shape=tuple(f_hat.shape), dtype=f_hat.dtype, device=f_hat.device)
    if d_f_hat is not None:
        check_tensor(op, "d_f_hat", d_f_hat, shape=tuple(f_hat.shape), dtype=f_hat.dtype, device=f_hat.device)
    dtype = fc2_weight.dtype
    d_f = matmul(d_q_hat, out_weight, residual=d_f_hat, out_dtype=dtype, op_dtype=dtype,
                 site="d_f")  # [L, D]
    d_out_weight = matmul(d_q_hat.t(), f_hat, out_dtype=dtype, op_dtype=dtype, site="d_out_weight")
    d_fc2_bias = alloc((f_hat.shape[1],), dtype, f_hat.device)
    d_fc2_weight = matmul(d_f.t(), h_bar, out_dtype=dtype, op_dtype=dtype, row_sum=d_fc2_bias,
                          site="d_fc2_weight")  # db2 = sum_l dF
    d_h_bar = matmul(d_f, fc2_weight, out_dtype=acc_dtype(dtype), op_dtype=dtype, site="d_h_bar")
    return d_h_bar, d_fc2_weight, d_fc2_bias, d_out_weight


def fold_output_weights(fc2_weight, fc2_bias, out_weight):
    """(W_out W2 [D, H], W_out b2 [D]) in the parameter dtype, accumulated in fp32 (fp64)."""
    op = "fold_output_weights"
    check_tensor(op, "W2", fc2_weight, shape=(None, None), dtype=FLOAT_DTYPES)
    D, dtype, dev = fc2_weight.shape[0], fc2_weight.dtype, fc2_weight.device
    check_tensor(op, "b2", fc2_bias, shape=(D,), dtype=dtype, device=dev)
    check_tensor(op, "W_out", out_weight, shape=(D, D), dtype=dtype, device=dev)
    w_fold = matmul(out_weight, fc2_weight, out_dtype=dtype, op_dtype=dtype, site="fold_weights")
    b_fold = matmul(out_weight, fc2_bias.reshape(-1, 1), out_dtype=dtype, op_dtype=dtype,
                    site="fold_weights").reshape(-1)
    return w_fold, b_fold


# ------------------------------------------------------------------------------------------ torch.library custom ops
@custom_op("geoalign::triton_output", mutates_args=())
def output_op(q: torch.Tensor, h_bar: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
              out_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_hat [L, D], f_hat [L, D])."""
    return output_forward(q, h_bar, fc2_weight, fc2_bias, out_weight)


@output_op.register_fake
def _output_fake(q, h_bar, fc2_weight, fc2_bias, out_weight):
    return torch.empty_like(q), torch.empty_like(q)


@custom_op("geoalign::triton_output_backward", mutates_args=())
def output_backward_op(d_q_hat: torch.Tensor, d_f_hat: torch.Tensor | None, h_bar: torch.Tensor, f_hat: torch.Tensor,
                       fc2_weight: torch.Tensor, out_weight: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_h_bar, d_fc2_weight, d_fc2_bias, d_out_weight)."""
    return output_backward(d_q_hat, d_f_hat, h_bar, f_hat, fc2_weight, out_weight)


@output_backward_op.register_fake
def _output_backward_fake(d_q_hat, d_f_hat, h_bar, f_hat, fc2_weight, out_weight):
    return (torch.empty_like(h_bar), torch.empty_like(fc2_weight), fc2_weight.new_empty((fc2_weight.shape[0],)),
            torch.empty_like(out_weight))


def _output_setup_context(ctx, inputs, output):
    _q, h_bar, fc2_weight, _fc2_bias, out_weight = inputs
    ctx.save_for_backward(h_bar, output[1], fc2_weight, out_weight)
    ctx.set_materialize_grads(False)  # f_hat is rarely used downstream: no zero-filled d_f_hat launch for it


def _output_autograd(ctx, d_q_hat, d_f_hat):
    h_bar, f_hat, fc2_weight, out_weight = ctx.saved_tensors
    if d_q_hat is None:  # only f_hat was used
        d_q_hat = torch.zeros_like(f_hat)
    d_h_bar, d_w2, d_b2, d_w_out = output_backward_op(d_q_hat, d_f_hat, h_bar, f_hat, fc2_weight, out_weight)
    return d_q_hat, d_h_bar, d_w2, d_b2, d_w_out


output_op.register_autograd(_output_autograd, setup_context=_output_setup_context)


@custom_op("geoalign::triton_output_folded", mutates_args=())
def output_folded_op(q: torch.Tensor, h_bar: torch.Tensor, w_fold: torch.Tensor, b_fold: torch.Tensor) -> torch.Tensor:
    """q_hat = q + h_bar W_fold^T + b_fold [L, D]; inference only (no autograd formula)."""
    _check_output_args("output_folded", q, h_bar, w_fold, b_fold)
    return matmul(h_bar, w_fold.t(), bias=b_fold.contiguous(), residual=q, out_dtype=q.dtype, op_dtype=q.dtype,
                  site="folded_output")


@output_folded_op.register_fake
def _output_folded_fake(q, h_bar, w_fold, b_fold):
    return torch.empty_like(q)


def output(q, h_bar, fc2_weight, fc2_bias, out_weight) -> torch.Tensor:
    """Q_hat [L, D] = Q + W_out (W2 h_bar + b2), autograd-aware."""
    return output_op(q, h_bar, fc2_weight, fc2_bias, out_weight)[0]
