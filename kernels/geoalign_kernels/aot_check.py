"""Ahead-of-time compile check: build every kernel for a CUDA target (default sm_90, H100/H200) at the Hopper configs
for bf16/fp16/fp32, without a GPU (ttir -> ttgir -> llir -> ptx -> cubin with Triton's bundled ptxas). Catches
GPU-only compile errors that the interpreter cannot see (dot shapes/dtypes, layouts, shared-memory use).

    env -u TRITON_INTERPRET python -m geoalign_kernels.aot_check [capability]

Each kernel's pointer arguments are typed by role: "param" (the parameter dtype), "acc" (fp32) and "i64" (ids, routes);
every other non-constexpr argument is an i32 scalar unless listed (strides are i64, eps fp32).
"""
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run without TRITON_INTERPRET (kernels must be JITFunctions)")

from . import bank, gemm, routing  # noqa: E402
from .configs import _HOPPER, GROUP_SIZE_M  # noqa: E402

TARGET = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
POINTER = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}


def compile_kernel(fn, pointers: dict, scalars: dict, consts: dict, num_warps: int, num_stages: int) -> None:
    """pointers: name -> role; scalars: name -> type (default i32); consts: the constexpr values (PARAM_DTYPE also
    types the "param" pointers; entries the kernel does not take are ignored)."""
    roles = {"acc": "*fp32", "i64": "*i64", "i32": "*i32", "param": POINTER[consts["PARAM_DTYPE"]]}
    label = roles["param"][1:]
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = roles[pointers[name]]
        elif name.startswith("stride_"):
            signature[name] = "i64"
        else:
            signature[name] = scalars.get(name, "i32")
    kernel = triton.compile(ASTSource(fn, signature, consts), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    print("OK", fn.__name__, label, "shared bytes", kernel.metadata.shared)


def tile(op: str) -> tuple[dict, int, int]:
    cfg = _HOPPER[(op, "large")]
    consts = {k: cfg[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")}
    return consts, cfg["num_warps"], cfg["num_stages"]


def main():
    for param, prec in [(tl.bfloat16, None), (tl.float16, None), (tl.float32, "ieee")]:
        types = dict(PARAM_DTYPE=param, DOT_DTYPE=param, ACC_DTYPE=tl.float32, DOT_PRECISION=prec)
        dot = {k: types[k] for k in ("DOT_DTYPE", "ACC_DTYPE", "DOT_PRECISION")}
        blocks, warps, stages = tile("gemm")
        gemm_ptrs = dict(a_ptr="param", b_ptr="param", c_ptr="param", bias_ptr="param", residual_ptr="param",
                         row_sum_ptr="param")
        compile_kernel(gemm._matmul_kernel, gemm_ptrs, {},
                       dict(SPLIT_K=1, HAS_BIAS=True, HAS_RESIDUAL=True, APPLY_GELU=False, HAS_ROW_SUM=False,
                            PARAM_DTYPE=param, **dot, **blocks, GROUP_SIZE_M=GROUP_SIZE_M), warps, stages)
        compile_kernel(gemm._matmul_kernel, gemm_ptrs, {},  # a weight gradient with its bias gradient (row sums)
                       dict(SPLIT_K=1, HAS_BIAS=False, HAS_RESIDUAL=False, APPLY_GELU=False, HAS_ROW_SUM=True,
                            PARAM_DTYPE=param, **dot, **blocks, GROUP_SIZE_M=GROUP_SIZE_M), warps, stages)
        compile_kernel(gemm._matmul_kernel, dict(gemm_ptrs, c_ptr="acc", row_sum_ptr="acc"), {},  # split-K partials
                       dict(SPLIT_K=4, HAS_BIAS=False, HAS_RESIDUAL=False, APPLY_GELU=False, HAS_ROW_SUM=True,
                            PARAM_DTYPE=param, **dot, **blocks, GROUP_SIZE_M=GROUP_SIZE_M), warps, stages)
        compile_kernel(routing._route_kernel, dict(hid_ptr="param", w2_ptr="param", b2_ptr="param",
                                                   topk_idx_ptr="i64", alpha_ptr="acc"), {},
                       dict(K=2, K_POW2=2, **types, BLOCK_SIZE_L=32, BLOCK_SIZE_M=16, BLOCK_SIZE_R=64), 4, 1)
        compile_kernel(routing._route_bwd_kernel, dict(d_alpha_ptr="acc", alpha_ptr="acc", topk_idx_ptr="i64",
                                                       d_logits_ptr="param"), {},
                       dict(K=2, K_POW2=2, ACC_DTYPE=tl.float32, BLOCK_SIZE_L=32, BLOCK_SIZE_M=16, PARAM_DTYPE=param),
                       4, 1)
        rows = _HOPPER[("rows", "large")]
        row_blocks = dict(BLOCK_SIZE_M=rows["BLOCK_SIZE_M"], BLOCK_SIZE_N=rows["BLOCK_SIZE_N"])
        if param == tl.bfloat16:  # (dtype-free kernels: once)
            compile_kernel(bank._bank_rows_kernel, dict(topk_ptr="i64", tokens_ptr="i64", slots_ptr="i64",
                                                        offsets_ptr="i64", positions_ptr="i64"), {},
                           dict(PARAM_DTYPE=param, BLOCK_SIZE=1024), 4, 1)
        for tape in (True, False):
            compile_kernel(bank._gather_normalize_kernel, dict(
                layer_ptr="param", gather_ptr="i64", tokens_ptr="i64", offsets_ptr="i64", x_hat_ptr="param",
                ln_weight_ptr="param", ln_bias_ptr="param", affine_ptr="param"), {"eps": "fp32"},
                dict(TAPE=tape, PARAM_DTYPE=param, ACC_DTYPE=tl.float32, **row_blocks), 4, 1)
        blocks, warps, stages = tile("bank_fwd")
        for tape in (True, False):  # training: every layer at once, z stored; inference: one layer into h_bar
            compile_kernel(bank._bank_fwd_kernel, dict(
                x_hat_ptr="param", ln_weight_ptr="param", ln_bias_ptr="param", w1_ptr="param", b1_ptr="param",
                tokens_ptr="i64", slots_ptr="i64", offsets_ptr="i64", alpha_ptr="acc", h_bar_ptr="acc",
                z_ptr="param"), {}, dict(TAPE=tape, **types, **blocks, GROUP_SIZE_M=GROUP_SIZE_M), warps, stages)
        compile_kernel(bank._bank_combine_kernel, dict(z_ptr="param", positions_ptr="i64", alpha_ptr="acc",
                                                       h_bar_ptr="acc"), {},
                       dict(PARAM_DTYPE=param, ACC_DTYPE=tl.float32, **row_blocks), 4, 1)
        compile_kernel(bank._bank_dz_kernel, dict(
            d_h_bar_ptr="acc", tokens_ptr="i64", slots_ptr="i64", alpha_ptr="acc", z_ptr="param", dz_ptr="param",
            d_alpha_partial_ptr="acc"), {},
            dict(PARAM_DTYPE=param, ACC_DTYPE=tl.float32, BLOCK_SIZE_M=rows["BLOCK_SIZE_M"],
                 BLOCK_SIZE_N=rows["BLOCK_SIZE_N"]), 4, 1)
        blocks, warps, stages = tile("bank_dw1")
        compile_kernel(bank._bank_weight_grad_kernel, dict(
            dz_ptr="param", x_hat_ptr="param", offsets_ptr="i64", ln_weight_ptr="param", ln_bias_ptr="param",
            w1_ptr="param", dw1_ptr="param", db1_ptr="acc", dgamma_partial_ptr="acc", dbeta_partial_ptr="acc"), {},
            dict(STORE_DW1=True, **types, **blocks), warps, stages)
        compile_kernel(bank._bank_backward_finish_kernel, dict(
            d_alpha_partial_ptr="acc", d_alpha_ptr="acc", dgamma_partial_ptr="acc", dbeta_partial_ptr="acc",
            d_gamma_ptr="param", d_beta_ptr="param", db1_acc_ptr="acc", db1_ptr="param"), {},
            dict(NEED_LN=True, PARAM_DTYPE=param, ACC_DTYPE=tl.float32, BLOCK_SIZE=128), 4, 1)

if __name__ == "__main__":
    main()
