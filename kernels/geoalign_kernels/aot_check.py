"""Ahead-of-time compile check: build every kernel for a CUDA target (default sm_90, H100/H200) at the Hopper configs
for bf16/fp16/fp32, without a GPU (ttir -> ttgir -> llir -> ptx -> cubin with Triton's bundled ptxas). Catches
GPU-only compile errors that the interpreter cannot see (dot shapes/dtypes, layouts, shared-memory use).

    env -u TRITON_INTERPRET python -m geoalign_kernels.aot_check [capability]
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

target = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)

def comp(fn, sig, consts, num_warps=4, num_stages=3):
    names = fn.arg_names
    full = {}
    for n in names:
        if n in consts:
            full[n] = "constexpr"
        else:
            full[n] = sig.get(n, "i32")
    src = ASTSource(fn, full, consts)
    k = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    print("OK", fn.__name__, consts.get("PARAM", consts.get("OP", "")), "shared bytes", k.metadata.shared)

def main():
    for P, OPD, ACC, PREC in [(tl.bfloat16, tl.bfloat16, tl.float32, None), (tl.float16, tl.float16, tl.float32, None), (tl.float32, tl.float32, tl.float32, "ieee")]:
        pp = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}[P]
        comp(gemm._matmul_kernel, dict(a_ptr=pp, b_ptr=pp, c_ptr=pp, bias_ptr=pp, res_ptr=pp),
             dict(HAS_BIAS=True, HAS_RES=True, ACT_GELU=False, OP=OPD, ACC=ACC, DOT_PREC=PREC, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3)
        comp(routing._route_kernel, dict(hid_ptr=pp, w2_ptr=pp, b2_ptr=pp, idx_ptr="*i32", alpha_ptr="*fp32"),
             dict(K=2, K_P=2, PARAM=P, OP=OPD, ACC=ACC, DOT_PREC=PREC, BLOCK_L=32, BLOCK_MB=16, BLOCK_K=64))
        comp(routing._route_bwd_kernel, dict(d_alpha_ptr="*fp32", alpha_ptr="*fp32", idx_ptr="*i32", ds_ptr=pp),
             dict(K=2, K_P=2, ACC=ACC, BLOCK_L=32, BLOCK_MB=16))
        comp(bank._ln_stats_kernel, dict(layer_ptr=pp, s_row="i64", gather_ptr="*i64", tokens_ptr="*i64", raw_ptr=pp, mean_ptr="*fp32", rstd_ptr="*fp32", eps="fp32"),
             dict(SAVE_RAW=True, PARAM=P, ACC=ACC, BLOCK_R=32, BLOCK_D=256))
        comp(bank._bank_fwd_kernel, dict(layer_ptr=pp, gather_ptr="*i64", tokens_ptr="*i64", slots_ptr="*i64", alpha_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
             lnw_ptr=pp, lnb_ptr=pp, w1_ptr=pp, b1_ptr=pp, h_ptr="*fp32", z_ptr=pp),
             dict(SAVE_Z=True, PARAM=P, OP=OPD, ACC=ACC, DOT_PREC=PREC, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3)
        comp(bank._bank_dz_kernel, dict(dh_ptr="*fp32", tokens_ptr="*i64", slots_ptr="*i64", alpha_ptr="*fp32", z_ptr=pp, dz_ptr=pp, d_alpha_ptr="*fp32", db1_part_ptr="*fp32"),
             dict(PARAM=P, ACC=ACC, BLOCK_M=32, BLOCK_N=256))
        comp(bank._bank_dw1_kernel, dict(dz_ptr=pp, raw_ptr=pp, mean_ptr="*fp32", rstd_ptr="*fp32", lnw_ptr=pp, lnb_ptr=pp, dw1_ptr=pp),
             dict(PARAM=P, OP=OPD, ACC=ACC, DOT_PREC=PREC, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3)
        comp(bank._bank_dx_kernel, dict(dz_ptr=pp, w1_ptr=pp, raw_ptr=pp, mean_ptr="*fp32", rstd_ptr="*fp32", dgamma_part_ptr="*fp32", dbeta_part_ptr="*fp32"),
             dict(PARAM=P, OP=OPD, ACC=ACC, DOT_PREC=PREC, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3)


if __name__ == "__main__":
    main()
