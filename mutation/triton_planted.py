"""Planted bugs in the Triton kernels, one at a time, against the Triton tests under the interpreter + guard mode.

A mutation tool is too slow for kernels that run under the Triton interpreter, so this is a hand-written list of the
realistic bugs a kernel author makes: off-by-one masks, a wrong row of LayerNorm statistics, a dropped max
subtraction, a transposed weight gradient, overwrite-instead-of-accumulate, a wrong tie rule, and so on. For each,
the kernel package is copied to a temporary directory, the one edit is applied there, and the tests that run Triton
kernels (`-m triton`, which includes the fuzz and the parity suites) run against the copy with GEOALIGN_GUARD=1
and `-x`. A planted bug is *caught* when that run fails.

    python -m mutation.triton_planted [--only NAME ...] [--out mutation/results/triton_planted.json]

It takes roughly 0.3-7 minutes per bug on 2 shared cores (a surviving bug costs the full Triton suite).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "geoalign_kernels"

# name: (file, exact text, replacement, what the bug is)
PLANTED = {
    "fwd-col-mask-off-by-one": ("bank.py", "    mask_n = offs_n < H\n    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N)",
                                "    mask_n = offs_n <= H\n    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N)",
                                "GEMM1 column mask lets column H through (a store one past each z row)"),
    "gemm-row-mask-off-by-one": ("gemm.py", "    mask_m = offs_m < M\n", "    mask_m = offs_m <= M\n",
                                 "shared GEMM row mask lets row M through (a store past the output)"),
    "normalize-row-mask-off-by-one": ("bank.py", "    mask_r = offs_r < n_rows\n", "    mask_r = offs_r <= n_rows\n",
                                      "gather + normalise handles one row past the pairs (a store past x_hat)"),
    "normalize-wrong-patch-row": ("bank.py", "    group = offs_r % G\n", "    group = offs_r % G * 0\n",
                                  "every patch row of a token gathers the token's first patch"),
    "affine-wrong-column": ("bank.py", "        ln_w = tl.load(ln_weight_ptr + offs_d, mask=mask_d, other=0.0)",
                            "        ln_w = tl.load(ln_weight_ptr + offs_d * 0, mask=mask_d, other=0.0)",
                            "the normalise pass scales every column of GEMM1's operand x by gamma[0]"),
    "layer-norm-one-pass-variance": ("bank.py", "tl.sqrt(tl.sum(centred * centred, axis=1) / D_geo + eps)",
                                     "tl.sqrt(tl.sum(v * v, axis=1) / D_geo - mean * mean + eps)",
                                     "LayerNorm variance as E[x^2] - E[x]^2 (one pass)"),
    "router-no-max-subtraction": ("routing.py", "tl.exp(selected - top[:, None])", "tl.exp(selected)",
                                  "router softmax without subtracting the row max"),
    "router-ties-to-higher-index": ("routing.py", "winner = tl.min(tl.where(candidate, offs_m[None, :], BLOCK_SIZE_M), axis=1)",
                                    "winner = tl.max(tl.where(candidate, offs_m[None, :], -1), axis=1)",
                                    "Top-K ties go to the higher bank index"),
    "router-bwd-no-softmax-centering": ("routing.py", "d_k = alpha_k * tl.sum(alpha * (d_alpha_k[:, None] - d_alpha), axis=1)",
                                        "d_k = alpha_k * d_alpha_k",
                                        "router backward drops the softmax Jacobian's centring"),
    "w-out-gradient-transposed": ("output.py", "d_out_weight = matmul(d_q_hat.t(), f_hat,",
                                  "d_out_weight = matmul(f_hat.t(), d_q_hat,", "dW_out computed transposed"),
    "h-bar-overwrite": ("bank.py", "tl.store(h_bar_ptrs, h_old + alpha * gelu(z.to(ACC_DTYPE)), mask=mask)",
                        "tl.store(h_bar_ptrs, alpha * gelu(z.to(ACC_DTYPE)), mask=mask)",
                        "GEMM1 epilogue overwrites h_bar instead of accumulating the token's K layers"),
    "dz-alpha-slot-0": ("bank.py", "    alpha = tl.load(alpha_ptr + (token * stride_alpha_l + slot)[:, None], mask=valid[:, None], other=0.0)\n    dh = ",
                        "    alpha = tl.load(alpha_ptr + (token * stride_alpha_l)[:, None], mask=valid[:, None], other=0.0)\n    dh = ",
                        "dz uses the token's slot-0 alpha for every slot"),
    "gelu-grad-sign": ("utils.py", "+ z * tl.exp(-0.5 * z * z) * 0.3989422804014327",
                       "- z * tl.exp(-0.5 * z * z) * 0.3989422804014327", "GELU derivative with the wrong sign"),
    "dw1-drops-beta-term": ("bank.py", "dw1 += acc * ln_w[None, :] + db1[:, None] * ln_b[None, :]", "dw1 += acc * ln_w[None, :]",
                            "dW1 = gamma M without the beta db1 term"),
    "dgamma-uses-m-without-w1": ("bank.py", "tl.sum(w1 * acc, axis=0)", "tl.sum(acc, axis=0)",
                                 "dgamma sums M instead of W1 M"),
    "weight-grad-pair-mask-off-by-one": ("bank.py", "            mask_p = offs_p < hi - p0\n", "            mask_p = offs_p <= hi - p0\n",
                                         "the weight-gradient GEMM reads one pair past each layer's last pair"),
    "weight-grad-gamma-of-layer-0": ("bank.py", "ln_w = tl.load(ln_weight_ptr + j * stride_ln_layer + offs_c % D_geo",
                                     "ln_w = tl.load(ln_weight_ptr + offs_c % D_geo",
                                     "the grouped dW1 epilogue uses layer 0's gamma for every layer"),
    "weight-grad-db1-last-layer-only": ("bank.py", "        db1_all += db1\n", "        db1_all = db1\n",
                                        "db1 keeps only the last layer's sum instead of all layers'"),
    "weight-grad-layers-start-at-0": ("bank.py", "        lo = tl.load(offsets_ptr + j).to(tl.int64)\n        hi = ",
                                      "        lo = tl.load(offsets_ptr).to(tl.int64)\n        hi = ",
                                      "every layer's pair range starts at pair 0 (reads the earlier layers' pairs)"),
    "fwd-layer-pairs-not-offset": ("bank.py", "        token = tl.load(tokens_ptr + first + offs_m, mask=mask_m",
                                   "        token = tl.load(tokens_ptr + offs_m, mask=mask_m",
                                   "inference GEMM1 adds layer j's rows into the tokens of the first pairs, not the "
                                   "layer's own"),
    "fwd-tiles-drop-partial-tile": ("bank.py", "        tiles = triton.cdiv(P, cfg[\"BLOCK_SIZE_M\"])\n",
                                    "        tiles = P // cfg[\"BLOCK_SIZE_M\"]\n",
                                    "training GEMM1 launches no tile for the last, partial row block of the pairs"),
    "fwd-row-mask-off-by-one": ("bank.py", "    mask_m = offs_m < n\n", "    mask_m = offs_m <= n\n",
                                "GEMM1 handles one row past its pairs (a store past z; at inference a stray update of "
                                "the next pair's token)"),
    "gemm1-k-mask-dropped": ("bank.py", "EVEN_K=width % cfg[\"BLOCK_SIZE_K\"] == 0", "EVEN_K=True",
                             "GEMM1 drops its K mask when G*D' is not a whole number of K tiles (each row of x reads "
                             "into the next)"),
    "normalize-stride-skips-blocks": ("bank.py", "n_rows, num_programs.to(tl.int64) * BLOCK_SIZE_M):",
                                      "n_rows, 2 * num_programs.to(tl.int64) * BLOCK_SIZE_M):",
                                      "the normalise pass's grid-stride loop skips every other round of row blocks"),
    "combine-overwrites-h-bar": ("bank.py", "tl.store(h_bar_ptrs, tl.load(h_bar_ptrs, mask=mask, other=0.0) + total, mask=mask)",
                                 "tl.store(h_bar_ptrs, total, mask=mask)",
                                 "the training forward's combine overwrites h_bar instead of adding to it"),
    "combine-alpha-of-slot-0": ("bank.py", "alpha = tl.load(alpha_ptr + offs_t * stride_alpha_l + s, mask=valid",
                                "alpha = tl.load(alpha_ptr + offs_t * stride_alpha_l + 0, mask=valid",
                                "every slot of a token weighted by alpha[t, 0] in the combine"),
    "rows-rank-off-by-one": ("bank.py", "        out = position + rank - 1\n", "        out = position + rank\n",
                             "the counting sort places each pair one past its slot (a store past tokens/slots)"),
    "rows-count-own-layer-below": ("bank.py", "(ids >= 0) & (ids < j)", "(ids >= 0) & (ids <= j)",
                                   "the counting sort starts layer j after its own pairs"),
    "normalize-stacks-gamma-as-beta": ("bank.py", "tl.store(out + stride_affine_kind, tl.load(ln_bias_ptr + d0 + offs_d",
                                       "tl.store(out + stride_affine_kind, tl.load(ln_weight_ptr + d0 + offs_d",
                                       "the normalise pass stacks gamma_j where beta_j belongs"),
    "normalize-no-program-for-an-empty-layer": ("bank.py", "    return max(1, min(blocks, cap))\n",
                                                "    return min(blocks, cap)\n",
                                                "a layer without pairs launches no normalise program, so its affine is "
                                                "never stacked (the split projector's empty banks)"),
    "finish-d-alpha-first-tile-only": ("bank.py", "        for i in range(0, n_alpha_tiles):\n",
                                       "        for i in range(0, 1):\n",
                                       "the backward's finish keeps only the first H tile's d_alpha partial"),
    "finish-dbeta-from-dgamma": ("bank.py", "d_beta += tl.load(dbeta_partial_ptr", "d_beta += tl.load(dgamma_partial_ptr",
                                 "dbeta reduced from the dgamma partials"),
    "gemm-row-sums-of-splits-collide": ("gemm.py", "row_sum_ptr + tl.program_id(1).to(tl.int64) * stride_row_sum_s + offs_m",
                                        "row_sum_ptr + offs_m",
                                        "every K range of a split GEMM writes its A-row sums to the same place"),
    "dz-d-alpha-partials-collide": ("bank.py", "(pid_n.to(tl.int64) * L + token) * K + slot", "token * K + slot",
                                    "every H tile of the dz kernel writes its d_alpha partial to the same place"),
    "route-kernel-k-mask": ("routing.py", "    kept = offs_slot[None, :] < K\n", "    kept = offs_slot[None, :] <= K\n",
                            "router kernel keeps one slot past K (a store past topk_idx/alpha rows)"),
    # the TMA paths (issue 31; their tests force GEOALIGN_TMA=1)
    "gemm-tma-transpose-dropped": ("gemm.py", "            a = a_ptr.load([off_k, off_m]).T\n",
                                   "            a = tl.trans(a_ptr.load([off_m, off_k]))\n",
                                   "the shared GEMM reads a column-major A's descriptor as if it held A itself"),
    "gemm-tma-k-not-advanced": ("gemm.py", "        off_k += BLOCK_SIZE_K\n", "        off_k += 0\n",
                                "the shared GEMM's TMA boxes never move along K (every step reads the first one)"),
    "weight-grad-tma-tail-skipped": ("bank.py", "        for p0 in range(p_start, hi, BLOCK_SIZE_K):",
                                     "        for p0 in range(hi, hi, BLOCK_SIZE_K):",
                                     "the weight gradient drops each layer's last partial step of pairs (the TMA path "
                                     "leaves it to masked loads; without TMA the whole layer)"),
    "gemm1-tma-w1-not-transposed": ("bank.py", "            w = w1_ptr.load([off_n, off_k]).T\n",
                                    "            w = tl.trans(w1_ptr.load([off_k, off_n]))\n",
                                    "GEMM1's TMA path reads W1's box at swapped coordinates"),
}


def run_one(name: str, timeout: int) -> dict:
    file, old, new, what = PLANTED[name]
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        pkg = Path(tmp) / "geoalign_kernels"
        shutil.copytree(KERNELS, pkg, ignore=shutil.ignore_patterns("__pycache__"))
        src = (pkg / file).read_text()
        if src.count(old) != 1:
            return {"name": name, "what": what, "status": "not-applied",
                    "detail": f"the text to replace occurs {src.count(old)} times in {file}"}
        (pkg / file).write_text(src.replace(old, new))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]),
                   TRITON_INTERPRET="1", GEOALIGN_GUARD="1", PYTHONDONTWRITEBYTECODE="1")
        check = subprocess.run([sys.executable, "-c", "import geoalign_kernels, sys; print(geoalign_kernels.__file__)"],
                               env=env, capture_output=True, text=True, cwd=ROOT)
        if not check.stdout.strip().startswith(tmp):
            return {"name": name, "what": what, "status": "error", "detail": f"copy not imported: {check.stdout}"}
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m",
                                   "triton and not slow and not gpu"], env=env, capture_output=True, text=True,
                                  cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "what": what, "status": "caught", "detail": f"timeout after {timeout}s",
                    "seconds": timeout}
        seconds = round(time.time() - t0, 1)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
        status = "survived" if proc.returncode == 0 else "caught"
        detail = lines[0] if lines else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        return {"name": name, "what": what, "status": status, "first_failure": detail[:300], "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="planted bug names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "mutation" / "results" / "triton_planted.json"))
    parser.add_argument("--timeout", type=int, default=1200)
    args = parser.parse_args(argv)
    names = args.only or list(PLANTED)
    results = []
    for name in names:
        r = run_one(name, args.timeout)
        results.append(r)
        print(f"{r['status']:>9}  {name}  ({r.get('seconds', '-')} s)  {r.get('first_failure', r.get('detail', ''))}",
              flush=True)
    sys.path.insert(0, str(ROOT))
    from geoalign.atomic_files import write_json

    caught = sum(r["status"] == "caught" for r in results)
    write_json(args.out, {"caught": caught, "total": len(results), "results": results})
    print(f"caught {caught} of {len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
