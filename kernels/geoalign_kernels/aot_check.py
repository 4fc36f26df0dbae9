"""Ahead-of-time compile check: build every kernel for a CUDA target (default sm_90, H100/H200) at the Hopper configs
for bf16/fp16/fp32, without a GPU (ttir -> ttgir -> llir -> ptx -> cubin with Triton's bundled ptxas). Catches
GPU-only compile errors that the interpreter cannot see (dot shapes/dtypes, layouts, shared-memory use), and reports
what decides a GEMM's speed: whether its loads are software-pipelined (and how many are TMA loads), shared memory,
registers and spills, with each build's compile time. GEOALIGN_AOT_JSON=FILE also writes every build as JSON (the
committed table: bench/results/aot_sm90_bf16_triton3.6.json).

    env -u TRITON_INTERPRET python -m geoalign_kernels.aot_check [capability [dtype ...]]   # dtype: bf16 fp16 fp32 fp64

Each kernel is built twice:
  - "generic": every integer argument unknown (no hints), as for odd shapes;
  - "launch": specialised as Triton's JIT specialises a launch at paper scale (L=8064 tokens, K=2, M=12 layers,
    G=4, D=D'=2048, H=4096, router 512): an integer argument equal to 1 becomes the constant 1, one divisible by 16
    and every pointer (torch allocations are aligned) carry tt.divisibility=16. Without these hints no load can be
    vectorised, so no GEMM is pipelined: only the "launch" build shows what a GPU runs.
A "launch" build of a GEMM kernel whose tile loads are not pipelined (no async copy in its TTGIR) fails the check.

Pointer arguments are typed by role: "param" (the parameter dtype), "acc" (fp32; fp64 for fp64) and "i64"; the other
non-constexpr arguments get their type from their example value (i32 when it fits, else i64; eps fp32).
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run without TRITON_INTERPRET (kernels must be JITFunctions)")

from . import bank, gemm, routing  # noqa: E402
from .configs import GROUP_SIZE_M, config_for  # noqa: E402

TARGET = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
#: every build's line, as dicts; written as JSON to GEOALIGN_AOT_JSON when that is set (bench/results/)
REPORT: list = []
DEVICE = "NVIDIA H200"  # the config tables' device (tuned_configs.json entries included)
#: paper scale: tokens, slots, bank layers, patch rows per token, D', H, pairs, router width, D
L, K, M, G, DG, H, P, R, D = 8064, 2, 12, 4, 2048, 4096, 8064 * 2, 512, 2048


def specialize(fn, pointers: dict, values: dict, consts: dict, launch: bool, param) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn`` for ASTSource; launch=True applies the JIT's launch-time rules to the
    example values (int == 1 -> constant 1; int % 16 == 0 and every pointer -> tt.divisibility 16)."""
    acc = "fp64" if param == tl.float64 else "fp32"
    roles = {"acc": f"*{acc}", "i64": "*i64", "i32": "*i32", "param": f"*{param.name}"}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    missing = [n for n in fn.arg_names if n not in consts and n not in pointers and n not in values]
    if missing:
        raise SystemExit(f"aot_check: no example value for {fn.__name__}'s arguments {missing}")
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers and pointers[name].startswith("desc"):  # a TMA descriptor: "desc:role:rows,cols"
            _, role, box = pointers[name].split(":")
            signature[name] = f"tensordesc<{roles[role][1:]}[{box.replace(',', ', ')}]>"
        elif name in pointers:
            signature[name] = roles[pointers[name]]
            if launch:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            signature[name] = "fp32"
        else:
            value = values[name]
            if launch and value == 1:
                consts[name] = 1
                signature[name] = "constexpr"
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if launch and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def ptxas_usage(ptx: str, name: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from ptxas -v on the build's PTX, with the first of Triton's bundled
    ptxas binaries that accepts its PTX version; (-1, -1) when none does."""
    paths = []
    for knob in ("ptxas", "ptxas_blackwell"):
        try:
            paths.append(getattr(triton.knobs.nvidia, knob).path)
        except AttributeError:
            pass
    arch = f"sm_{TARGET.arch}a" if TARGET.arch >= 90 else f"sm_{TARGET.arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for path in paths:
            proc = subprocess.run([path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            text = proc.stderr
            at = text.find(f"Compiling entry function '{name}'")  # this kernel's block only (not a helper .func's)
            text = text[at:] if at >= 0 else ""
            nxt = text.find("Compiling entry function", 1)
            text = text if nxt < 0 else text[:nxt]
            regs = re.search(r"Used (\d+) registers", text)
            spills = re.search(r"(\d+) bytes spill stores", text)
            if proc.returncode == 0 and regs and spills:
                return int(regs.group(1)), int(spills.group(1))
    return -1, -1


def compile_kernel(fn, pointers: dict, values: dict, consts: dict, num_warps: int, num_stages: int,
                   pipelined: bool = False, variant: str = "", tma: bool = False) -> None:
    """Build ``fn`` generic and launch-specialised (see the module docstring) and print one line per build.
    values: every non-pointer, non-constexpr argument's paper-scale example; consts: the constexpr values
    (PARAM_DTYPE also types the "param" pointers; entries the kernel does not take are ignored).
    pipelined: a GEMM kernel whose launch build must have pipelined (async-copied) tile loads.
    variant: a tag printed after the kernel's name (kernel[variant]) where one kernel is built several ways.
    tma: a build whose operands are TMA descriptors: its launch build must have TMA loads."""
    param = consts["PARAM_DTYPE"]
    for build in ("generic", "launch"):
        signature, constexprs, attrs = specialize(fn, pointers, values, consts, build == "launch", param)
        t0 = time.perf_counter()
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                options={"num_warps": num_warps, "num_stages": num_stages})
        compile_ms = round(1000 * (time.perf_counter() - t0))
        ttgir = kernel.asm["ttgir"]
        copies = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local")
        tma_loads = ttgir.count("async_tma_copy_global_to_local") + ttgir.count("tt.descriptor_load")
        regs, spills = ptxas_usage(kernel.asm["ptx"], fn.__name__)
        name = f"{fn.__name__}[{variant}]" if variant else fn.__name__
        print("OK", name, param.name, build, "shared bytes", kernel.metadata.shared, "async copies", copies,
              "tma loads", tma_loads, "registers", regs, "spill bytes", spills, "compile ms", compile_ms, flush=True)
        REPORT.append({"kernel": name, "dtype": param.name, "build": build, "shared_bytes": kernel.metadata.shared,
                       "pipelined_loads": copies, "tma_loads": tma_loads, "registers": regs, "spill_bytes": spills,
                       "compile_s": compile_ms / 1000, "num_warps": num_warps, "num_stages": num_stages})
        if build == "launch" and tma and tma_loads == 0:
            raise SystemExit(f"aot_check: {name} ({param.name}, launch build) has no TMA loads")
        if build == "launch" and pipelined and copies == 0:
            raise SystemExit(f"aot_check: {name} ({param.name}, launch build) has no pipelined "
                             "loads: its GEMM would run unpipelined on the GPU")


def tile(op: str, dtype: torch.dtype, rows: int = P, n: int | None = None, k: int | None = None
         ) -> tuple[dict, int, int]:
    """(block sizes, num_warps, num_stages) the launcher gets for GEMM site ``op`` on an H200 at ``rows`` x ``n``
    output rows and reduction length ``k``: the configs module's own lookup (tuned_configs.json, else the static
    table; fp64 adjusted)."""
    cfg = config_for(op, rows, DEVICE, dtype, n, k)
    consts = {k: cfg[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")}
    return consts, cfg["num_warps"], cfg["num_stages"]


def main():
    only = sys.argv[2:]  # optional dtype names (bf16 fp16 fp32 fp64): build only these
    sorted_rows = False
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        types = bank._dtypes(dtype)  # the launchers' own dtype constexprs (PARAM, DOT, ACC, DOT_PRECISION)
        param, acc = types["PARAM_DTYPE"], types["ACC_DTYPE"]
        if only and param.name not in only:
            continue
        tensor_cores = dtype in (torch.bfloat16, torch.float16)
        ds_row = -(-M // (16 // dtype.itemsize)) * (16 // dtype.itemsize)  # dS's padded row (routing.route_backward)
        gemm_ptrs = dict(a_ptr="param", b_ptr="param", c_ptr="param", bias_ptr="param", residual_ptr="param",
                         row_sum_ptr="param")

        def gemm_tile(site, rows, n, k):  # the shared GEMM's constexprs, warps and stages at this call site
            blocks, warps, stages = tile(site, dtype, rows, n, k)
            return dict(types, **blocks, GROUP_SIZE_M=GROUP_SIZE_M), blocks, warps, stages

        def desc(role, rows, cols):  # a TMA descriptor argument of a [rows, cols] box
            return f"desc:{role}:{rows},{cols}"

        # each shared-GEMM site twice on sm_90: pointer loads (the fallback) and TMA descriptors (A_TMA / B_TMA:
        # 1 a descriptor of the operand, 2 of its transpose), and out_proj once more on the persistent grid
        sites = [
            # the output stage's first GEMM: f_hat = h_bar [L, H] (fp32 / fp64) @ fc2^T (fc2 [D, H] row-major) + b2
            ("fc2", L, D, H, dict(gemm_ptrs, a_ptr="acc"), ("acc", 1), ("param", 2),
             dict(stride_am=H, stride_ak=1, stride_bk=1, stride_bn=H, stride_cm=D, stride_cn=1, stride_rm=D,
                  stride_rn=1), dict(HAS_BIAS=True, HAS_RESIDUAL=False, HAS_ROW_SUM=False)),
            # its second: q_hat = f_hat [L, D] @ out_proj^T (out_proj [D, D]) + q
            ("out_proj", L, D, D, gemm_ptrs, ("param", 1), ("param", 2),
             dict(stride_am=D, stride_ak=1, stride_bk=1, stride_bn=D, stride_cm=D, stride_cn=1, stride_rm=D,
                  stride_rn=1), dict(HAS_BIAS=False, HAS_RESIDUAL=True, HAS_ROW_SUM=False)),
            # a weight gradient with its bias gradient (row sums): dfc2 = dF^T [D, L] @ h_bar [L, H] (fp32 / fp64)
            ("d_fc2_weight", D, H, L, dict(gemm_ptrs, b_ptr="acc"), ("param", 2), ("acc", 1),
             dict(stride_am=1, stride_ak=D, stride_bk=H, stride_bn=1, stride_cm=H, stride_cn=1, stride_rm=H,
                  stride_rn=1), dict(HAS_BIAS=False, HAS_RESIDUAL=False, HAS_ROW_SUM=True)),
            # split-K partials: the router's dW2 = dS^T [M, L] @ hid [L, R] into fp32 / fp64 [SPLIT_K, M, R], split
            # as gemm.split_k_for splits it on a 132-SM H200 (dS's rows padded to 16 bytes: routing.route_backward)
            ("router_d_w2", M, R, L, dict(gemm_ptrs, c_ptr="acc", bias_ptr="acc", residual_ptr="acc",
                                          row_sum_ptr="acc"), ("param", 2), ("param", 1),
             dict(stride_am=1, stride_ak=ds_row, stride_bk=R, stride_bn=1, stride_cm=R, stride_cn=1, stride_rm=R,
                  stride_rn=1), dict(HAS_BIAS=False, HAS_RESIDUAL=False, HAS_ROW_SUM=True)),
            # the router's d_hid = dS [L, M] @ W2 [M, R] (K = 12 bank layers)
            ("router_d_hid", L, R, M, gemm_ptrs, ("param", 1), ("param", 1),
             dict(stride_am=ds_row, stride_ak=1, stride_bk=R, stride_bn=1, stride_cm=R, stride_cn=1, stride_rm=R,
                  stride_rn=1), dict(HAS_BIAS=False, HAS_RESIDUAL=False, HAS_ROW_SUM=False)),
        ]
        for site, rows_m, n, k, ptrs, (a_role, a_mode), (b_role, b_mode), strides, epilogue in sites:
            gemm_consts, blocks, warps, stages = gemm_tile(site, rows_m, n, k)
            splits = gemm.split_k_for(rows_m, n, k, blocks, 132) if site == "router_d_w2" else 1
            values = dict(M=rows_m, N=n, K=k, stride_cs=rows_m * n if splits > 1 else 0,
                          stride_row_sum_s=rows_m if splits > 1 else 0, **strides)
            bm, bn, bk = blocks["BLOCK_SIZE_M"], blocks["BLOCK_SIZE_N"], blocks["BLOCK_SIZE_K"]
            tma_ptrs = dict(ptrs, a_ptr=desc(a_role, *((bm, bk) if a_mode == 1 else (bk, bm))),
                            b_ptr=desc(b_role, *((bk, bn) if b_mode == 1 else (bn, bk))))
            builds = [("", ptrs, 0, 0, False)]
            if tensor_cores:  # (GEOALIGN_TMA=auto takes TMA for the tensor-core dtypes only: configs.tma_enabled)
                builds.append(("tma", tma_ptrs, a_mode, b_mode, False))
            if site == "out_proj" and tensor_cores:
                builds.append(("tma,persistent", tma_ptrs, a_mode, b_mode, True))
            for tag, p, am, bmode, persistent in builds:
                name = site + (f",split_k{splits}" if splits > 1 else "") + (f",{tag}" if tag else "")
                compile_kernel(gemm._matmul_kernel, p, values,
                               dict(SPLIT_K=splits, APPLY_GELU=False, A_TMA=am, B_TMA=bmode, PERSISTENT=persistent,
                                    **epilogue, **gemm_consts), warps, stages, pipelined=True, variant=name,
                               tma=bool(tag))
        rows, row_warps, _ = tile("rows", dtype, L)  # the row kernels' config (routing takes its warps too)
        row_blocks = dict(BLOCK_SIZE_M=rows["BLOCK_SIZE_M"], BLOCK_SIZE_N=rows["BLOCK_SIZE_N"])
        compile_kernel(routing._route_kernel, dict(hid_ptr="param", w2_ptr="param", b2_ptr="param",
                                                   topk_idx_ptr="i64", alpha_ptr="acc"),
                       dict(L=L, R=R, M=M, stride_hid_l=R, stride_hid_r=1, stride_w2_m=R, stride_w2_r=1),
                       dict(K=K, K_POW2=K, **types, BLOCK_SIZE_L=routing._block_l(rows),
                            BLOCK_SIZE_M=routing._block_m(M), BLOCK_SIZE_R=max(16, rows["BLOCK_SIZE_K"])), row_warps, 1)
        compile_kernel(routing._route_backward_kernel, dict(d_alpha_ptr="acc", alpha_ptr="acc", topk_idx_ptr="i64",
                                                       d_logits_ptr="param"),
                       dict(L=L, M=M, stride_d_logits_l=ds_row),
                       dict(K=K, K_POW2=K, ACC_DTYPE=acc, BLOCK_SIZE_L=routing._block_l(rows),
                            BLOCK_SIZE_M=routing._block_m(M), PARAM_DTYPE=param),
                       row_warps, 1)
        if not sorted_rows:  # the counting sort has no float operand: built once
            compile_kernel(bank._bank_rows_kernel, dict(topk_ptr="i64", tokens_ptr="i64", slots_ptr="i64",
                                                        offsets_ptr="i64", positions_ptr="i64"),
                           dict(n_pairs=P, K=K, M=M), dict(PARAM_DTYPE=param, BLOCK_SIZE=1024), 4, 1)
            sorted_rows = True
        frames_rows = 32 * 1374  # a VGGT layer's rows at 32 frames (camera + register + 37 x 37 patch tokens each)
        for tape in (True, False):
            compile_kernel(bank._gather_normalize_kernel, dict(
                layer_ptr="param", gather_ptr="i64", tokens_ptr="i64", offsets_ptr="i64", x_hat_ptr="param",
                x_ptr="param", ln_weight_ptr="param", ln_bias_ptr="param", affine_ptr="param"),
                dict(stride_layer_row=DG, N=frames_rows, stride_gather_l=G, stride_gather_g=1, L=L, layer_pos=3,
                     stride_affine_kind=M * DG, stride_affine_layer=DG, G=G, D_geo=DG, eps=1e-6),
                dict(TAPE=tape, PARAM_DTYPE=param, ACC_DTYPE=acc, **bank._normalize_blocks(DG, rows)), row_warps, 1,
                variant="tape" if tape else "layer")
        for tape, tma in ((True, False), (False, False)) + (((True, True), (False, True)) if tensor_cores else ()):
            # training: every layer at once, z stored; inference: one layer into h_bar; pointer loads or TMA
            blocks, warps, stages = tile("gemm1_train" if tape else "gemm1_infer", dtype, P if tape else L, H, G * DG)
            bm, bn, bk = blocks["BLOCK_SIZE_M"], blocks["BLOCK_SIZE_N"], blocks["BLOCK_SIZE_K"]
            ptrs = dict(x_ptr="param", w1_ptr="param", b1_ptr="param", tokens_ptr="i64", slots_ptr="i64",
                        offsets_ptr="i64", alpha_ptr="acc", h_bar_ptr="acc", z_ptr="param")
            if tma:
                ptrs.update(x_ptr=desc("param", bm, bk), w1_ptr=desc("param", bn, bk))
            compile_kernel(bank._bank_gemm1_kernel, ptrs,
                dict(stride_w1_h=G * DG, stride_w1_k=1, layer_pos=3, stride_alpha_l=K, stride_h_bar_l=H,
                     n_pairs=P if tape else L, H=H, width=G * DG, L=L, K=K,  # L: the largest possible layer
                     num_row_tiles=-(-(P if tape else L) // bm)),
                dict(TAPE=tape, USE_TMA=tma, **bank._even(blocks, G * DG, H), **types, **blocks,
                     GROUP_SIZE_M=GROUP_SIZE_M),
                warps, stages, pipelined=True, variant=("tape" if tape else "layer") + (",tma" if tma else ""), tma=tma)
        compile_kernel(bank._bank_combine_kernel, dict(z_ptr="param", positions_ptr="i64", alpha_ptr="acc",
                                                       h_bar_ptr="acc"),
                       dict(stride_alpha_l=K, stride_h_bar_l=H, L=L, H=H, K=K, P=P),
                       dict(PARAM_DTYPE=param, ACC_DTYPE=acc, **row_blocks), row_warps, 1)
        compile_kernel(bank._bank_dz_kernel, dict(
            d_h_bar_ptr="acc", tokens_ptr="i64", slots_ptr="i64", alpha_ptr="acc", z_ptr="param", dz_ptr="param",
            d_alpha_partial_ptr="acc"), dict(stride_d_h_bar_l=H, stride_alpha_l=K, P=P, H=H, L=L, K=K),
            dict(PARAM_DTYPE=param, ACC_DTYPE=acc, **row_blocks), row_warps, 1)
        blocks, warps, stages = tile("weight_grad", dtype, H, G * DG, P)
        bm, bn, bk = blocks["BLOCK_SIZE_M"], blocks["BLOCK_SIZE_N"], blocks["BLOCK_SIZE_K"]
        for tma in (False, True) if tensor_cores else (False,):
            ptrs = dict(dz_ptr="param", x_hat_ptr="param", dz_desc="param", x_hat_desc="param", offsets_ptr="i64",
                        ln_weight_ptr="param", ln_bias_ptr="param", w1_ptr="param", dw1_ptr="param", db1_ptr="acc",
                        dgamma_partial_ptr="acc", dbeta_partial_ptr="acc")
            if tma:
                ptrs.update(dz_desc=desc("param", bk, bm), x_hat_desc=desc("param", bk, bn))
            compile_kernel(bank._bank_weight_grad_kernel, ptrs,
                dict(num_layers=M, stride_ln_layer=DG, stride_w1_h=G * DG, stride_w1_k=1, H=H, D_geo=DG, G=G),
                dict(STORE_DW1=True, USE_TMA=tma, **types, **blocks), warps, stages, pipelined=True,
                variant="tma" if tma else "", tma=tma)
        compile_kernel(bank._bank_backward_finish_kernel, dict(
            d_alpha_partial_ptr="acc", d_alpha_ptr="acc", dgamma_partial_ptr="acc", dbeta_partial_ptr="acc",
            d_gamma_ptr="param", d_beta_ptr="param", db1_acc_ptr="acc", db1_ptr="param"),
            dict(n_alpha_tiles=H // rows["BLOCK_SIZE_N"], n_alpha=P, n_h_tiles=H // blocks["BLOCK_SIZE_M"], M=M, G=G,
                 D_geo=DG, H=H),
            dict(NEED_LN=True, PARAM_DTYPE=param, ACC_DTYPE=acc, BLOCK_SIZE=128), 4, 1)


if __name__ == "__main__":
    main()
    if os.environ.get("GEOALIGN_AOT_JSON"):
        import json

        from .configs import write_atomic

        write_atomic(os.environ["GEOALIGN_AOT_JSON"], json.dumps(
            {"target": f"sm_{TARGET.arch}", "triton": triton.__version__, "device_configs": DEVICE, "builds": REPORT},
            indent=1).encode())
