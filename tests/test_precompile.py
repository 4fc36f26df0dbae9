"""geoalign_kernels.precompile and bench/proof_plan.py: the launches of a workload are recorded without compiling or
running anything; the records built in a process pool land under the JIT's own cache keys (a relaunch in
compile-only mode builds nothing new, while an empty cache gets one entry per record); and the GPU proof's time
plan fits its one device call.

Recording needs Triton's JIT, not the interpreter this suite runs under, so the workloads run in a subprocess,
on this CPU as on an H100 (precompile.planning_target), building for sm_90 with Triton's bundled compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = textwrap.dedent("""
    import json, os, sys, torch

    def main():  # (under __main__: the compile pool's spawned workers import this file)
        from geoalign_kernels import precompile, utils
        import geoalign.backends as backends
        from bench.fusion_case import make_case
        from bench.gpu_proof import DRY_SHAPE

        backends.triton_available = lambda: True
        utils.POISON = True  # every buffer a kernel must write starts NaN: one that is not NaN was launched into
        fusion, q, layers, gi = make_case(DRY_SHAPE, 1, torch.bfloat16, torch.device("cpu"))

        def workload():
            out = fusion(q, layers, gi, backend="triton")
            out.backward(torch.ones_like(out))
            with torch.no_grad():
                return fusion(q, layers, gi, backend="triton"), out

        mode, path = sys.argv[1], sys.argv[2]
        with precompile.planning_target():
            if mode == "record":
                with precompile.Recorder() as rec:
                    infer, out = workload()
                result = {"records": rec.records,
                          "unwritten": bool(torch.isnan(out).all() and torch.isnan(infer).all())}
                built = precompile.compile_records(rec.records, workers=2, cache_dir=sys.argv[3])
                result["builds"] = built["builds"]
            else:  # relaunch: compile (or load) every variant, run none
                cache = os.environ["TRITON_CACHE_DIR"]
                before = set(os.listdir(cache)) if os.path.isdir(cache) else set()
                with precompile.compile_only():
                    workload()
                result = {"new_entries": len(set(os.listdir(cache)) - before)}
        json.dump(result, open(path, "w"))

    if __name__ == "__main__":
        main()
""")


def _run(tmp_path, *args, cache=None):
    # (no guard mode: its host checks would read routes that no kernel wrote)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GEOALIGN_GUARD")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels")])
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    out = tmp_path / f"{args[0]}-{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run([sys.executable, str(script), args[0], str(out), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_recorded_variants_build_under_the_jit_s_own_cache_keys(tmp_path):
    cache = tmp_path / "cache"
    rec = _run(tmp_path, "record", str(cache))
    records = rec["records"]
    names = {r["name"] for r in records}
    # a training step and an inference pass: routing, the bank's sort / normalise / GEMM1 / backward, output GEMMs
    assert {"_route_kernel", "_bank_rows_kernel", "_gather_normalize_kernel", "_bank_gemm1_kernel",
            "_bank_weight_grad_kernel", "_matmul_kernel", "_route_backward_kernel"} <= names, names
    assert all(r["target"] == ["cuda", 90, 32] for r in records)
    assert len({r["specialization"] for r in records}) == len(records), "a variant recorded twice"
    assert rec["unwritten"], "recording must neither compile nor run a kernel"
    assert all(b["error"] is None for b in rec["builds"]), [b for b in rec["builds"] if b["error"]]
    assert len(list(cache.iterdir())) == len(records)
    # the same workload relaunched against that cache builds nothing; against an empty one, every variant
    assert _run(tmp_path, "relaunch", cache=cache)["new_entries"] == 0
    assert _run(tmp_path, "relaunch", cache=tmp_path / "empty")["new_entries"] == len(records)


def test_the_recorder_refuses_the_interpreter():
    from geoalign_kernels.precompile import Recorder, planning_target

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with Recorder():
            pass
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with planning_target():
            pass


def test_the_committed_plan_fits_and_a_slow_one_does_not():
    from bench import proof_plan

    measurement = proof_plan.load_measurement()
    assert measurement["target"] == "sm_90" and not measurement["dry"] and not measurement["errors"]
    assert not measurement["record_errors"] and measurement["triton"] == "3.6.0"  # the GPU image's triton
    assert set(measurement["stages"]) == set(proof_plan.RECORDED)
    p = proof_plan.plan(measurement)
    assert p["fits"] and p["spare_s"] >= proof_plan.SPARE_S, proof_plan.format_plan(p)
    text = proof_plan.format_plan(p)
    assert "csrc build || precompile" in text and "fits" in text and "stage parity" in text
    # the stages in order of value: parity, the fusion table, tune, then the rest; pytest takes what is left
    names = [n for n, _ in proof_plan.STAGE_BUDGETS]
    assert names[1:4] == ["parity", "fusion", "tune"] and names[-1] == "pytest"
    slow = dict(measurement, builds=[{"kernel": "k", "seconds": 400.0, "error": None}])
    bad = proof_plan.plan(slow)
    assert not bad["fits"] and "DOES NOT FIT" in proof_plan.format_plan(bad)
