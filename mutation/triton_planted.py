"""Planted bugs in the Triton kernels, one at a time, against the Triton tests under the interpreter + guard mode.

A mutation tool is too slow for kernels that run under the Triton interpreter, so this is a hand-written list of the
realistic bugs a kernel author makes: off-by-one masks, a wrong row of LayerNorm statistics, a dropped max
subtraction, a transposed weight gradient, overwrite-instead-of-accumulate, a wrong tie rule, and so on. For each,
the kernel package is copied to a temporary directory, the one edit is applied there, and the tests that run Triton
kernels (`-m triton`, which includes the fuzz and the parity suites) run against the copy with GEOALIGN_GUARD=1
and `-x`. A planted bug is *caught* when that run fails.

    python -m mutation.triton_planted [--only NAME ...] [--out mutation/results/triton_planted.json]

It takes roughly 1-3 minutes per bug on 2 cores (a surviving bug costs the full Triton suite).
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
    "fwd-col-mask-off-by-one": ("bank.py", "    mn = rn < H\n", "    mn = rn <= H\n",
                                "GEMM1 column mask lets column H through (a store one past each h_bar row)"),
    "gemm-row-mask-off-by-one": ("gemm.py", "    mm = rm < M\n", "    mm = rm <= M\n",
                                 "shared GEMM row mask lets row M through (a store past the output)"),
    "ln-stats-row-mask-off-by-one": ("bank.py", "    mr = r < n_rows\n", "    mr = r <= n_rows\n",
                                     "LN-statistics pre-pass handles one row past the pairs"),
    "fwd-ln-stats-wrong-row": ("bank.py", "mean_ptr + rp * G + g, mask=mp", "mean_ptr + rp * G, mask=mp",
                               "GEMM1 normalises every patch row with patch row 0's mean"),
    "dw1-ln-stats-wrong-row": ("bank.py", "        row = p * G + g\n", "        row = p * G\n",
                               "dW1 recomputes LN with patch row 0's statistics for every patch row"),
    "ln-one-pass-variance": ("bank.py", "        xc = tl.where(m, x - mean[:, None], 0.0)\n        sq += tl.sum(xc * xc, axis=1)\n"
                             "    rstd = tl.where(ok, 1.0 / tl.sqrt(sq / Dg + eps), float(\"nan\"))",
                             "        xc = tl.where(m, x, 0.0)\n        sq += tl.sum(xc * xc, axis=1)\n"
                             "    rstd = tl.where(ok, 1.0 / tl.sqrt(sq / Dg - mean * mean + eps), float(\"nan\"))",
                             "LayerNorm variance as E[x^2] - E[x]^2 (one pass)"),
    "router-no-max-subtraction": ("routing.py", "tl.exp(sel - top[:, None])", "tl.exp(sel)",
                                  "router softmax without subtracting the row max"),
    "router-ties-to-higher-index": ("routing.py", "j = tl.min(tl.where(cand, cm[None, :], BLOCK_MB), axis=1)",
                                    "j = tl.max(tl.where(cand, cm[None, :], -1), axis=1)",
                                    "Top-K ties go to the higher bank index"),
    "router-bwd-no-softmax-centering": ("routing.py", "alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=1)[:, None])",
                                        "alpha * d_alpha", "router backward drops the softmax Jacobian's centring"),
    "w-out-gradient-transposed": ("output.py", "d_out_weight = matmul(d_q_hat.t(), f_hat,",
                                  "d_out_weight = matmul(f_hat.t(), d_q_hat,", "dW_out computed transposed"),
    "h-bar-overwrite": ("bank.py", "tl.store(h_off, h_old + a[:, None] * gelu(z.to(ACC)), mask=m_h)",
                        "tl.store(h_off, a[:, None] * gelu(z.to(ACC)), mask=m_h)",
                        "GEMM1 epilogue overwrites h_bar instead of accumulating the token's K layers"),
    "dz-alpha-slot-0": ("bank.py", "    ok = mp & (t >= 0) & (t < L) & (s >= 0) & (s < K)  # ids out of range: no read or write through them\n"
                        "    a = tl.load(alpha_ptr + t * s_al + s, mask=ok, other=0.0).to(ACC)\n    d_alpha = ",
                        "    ok = mp & (t >= 0) & (t < L) & (s >= 0) & (s < K)  # ids out of range: no read or write through them\n"
                        "    a = tl.load(alpha_ptr + t * s_al, mask=ok, other=0.0).to(ACC)\n    d_alpha = ",
                        "dz uses the token's slot-0 alpha for every slot"),
    "gelu-grad-sign": ("utils.py", "+ z * tl.exp(-0.5 * z * z) * 0.3989422804014327",
                       "- z * tl.exp(-0.5 * z * z) * 0.3989422804014327", "GELU derivative with the wrong sign"),
    "db1-unmasked-partials": ("bank.py", "tl.sum(tl.where(m, dz.to(ACC), 0.0), axis=0)", "tl.sum(dz.to(ACC), axis=0)",
                              "db1 partial sums include masked-out rows (finite garbage there)"),
    "dgamma-uses-raw-x": ("bank.py", "tl.sum(dx * x_hat, axis=0)", "tl.sum(dx * x, axis=0)",
                          "dgamma multiplies by the raw rows instead of the normalised ones"),
    "route-kernel-k-mask": ("routing.py", "    kept = kc[None, :] < K\n", "    kept = kc[None, :] <= K\n",
                            "router kernel keeps one slot past K (a store past topk_idx/alpha rows)"),
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
