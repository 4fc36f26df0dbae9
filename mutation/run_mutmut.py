"""The mutation-testing job (slow; not part of CI): mutmut over the pure-Python core, one module group at a time.

    pip install mutmut
    python mutation/run_mutmut.py                      # every group
    python mutation/run_mutmut.py --group fusion-core  # one group
    python mutation/run_mutmut.py --group eval-metrics --mutants 'geoalign.eval.caption.x_simple_tokenize__mutmut_*'

Each group runs in a fresh copy of the working tree (so groups do not share mutmut's caches) with its own
[mutmut] section: the modules to mutate, and the test files that exercise them (mutmut then runs, per mutant, only
the tests that call the mutated function). Triton, slow and GPU tests are deselected: the Triton kernels have their
own planted-bug job (mutation/triton_planted.py). Results go to mutation/results/<group>.json: per module the
number of mutants killed, timed out, survived and without tests, the score, and every survivor with its diff.

Score = (killed + timeout) / (mutants - equivalent), where mutation/equivalent/<group>.json names the survivors that
are equivalent (no test can tell them apart from the original):

    {"<mutant name>": {"mutated": "<the mutant's + line, stripped>", "reason": "<why no test can tell>"}}

An entry counts only while its "mutated" line is still in that mutant's diff: mutmut numbers mutants per function,
so an edit to the function renumbers them, and a stale entry is reported (not counted) rather than excusing a
different mutant.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS = {
    "fusion-core": {
        "mutate": ["geoalign/backends/reference.py", "geoalign/backends/torch_sparse.py", "geoalign/routing.py",
                   "geoalign/fusion.py"],
        "tests": ["tests/test_parity.py", "tests/test_routing_policy.py", "tests/test_parity_options.py",
                  "tests/test_variants.py", "tests/test_inputs.py", "tests/test_memory.py", "tests/test_fuzz_parity.py",
                  "tests/test_bad_inputs.py", "tests/test_cuda_backend.py"],
        # torch.compile cannot trace mutmut's trampolines (a contextvar lookup): the stats run fails on it
        "deselect": ["tests/test_cuda_backend.py::test_compiled_matches_eager"],
    },
    "alignment": {
        "mutate": ["geoalign/geometry/alignment.py"],
        "tests": ["tests/test_geometry_alignment.py", "tests/test_geometry_frames.py"],
    },
    "eval-metrics": {
        "mutate": ["geoalign/eval/vsibench.py", "geoalign/eval/scanqa.py", "geoalign/eval/sqa3d.py",
                   "geoalign/eval/textnorm.py", "geoalign/eval/caption.py"],
        "tests": ["tests/test_eval_metrics.py", "tests/test_eval_runners.py"],
    },
    "gap-metrics": {
        "mutate": ["geoalign/eval/boxes3d.py", "geoalign/eval/gap.py"],
        "tests": ["tests/test_gap_boxes.py", "tests/test_gap_finetune_data.py", "tests/test_eval_gap.py"],
    },
    "training": {
        "mutate": ["geoalign/training/data.py", "geoalign/training/checkpoint.py", "geoalign/training/loss_scaling.py",
                   "geoalign/atomic_files.py"],
        "tests": ["tests/test_train_data.py", "tests/test_train_loss_scaling.py", "tests/test_atomic_files.py",
                  "tests/test_train_checkpoint.py", "tests/test_bad_inputs.py", "tests/test_train_loop.py"],
    },
}

DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def write_config(copy: Path, group: dict) -> None:
    lines = ["[mutmut]", "source_paths = geoalign/", "only_mutate ="]
    lines += [f"    {m}" for m in group["mutate"]]
    lines += ["also_copy =", "    kernels/", "    bench/", "    docs/", "    README.md", "    pytest.ini",
              "pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in group["tests"]]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -m", "    not triton and not slow and not gpu",
              *[f"    --deselect={t}" for t in group.get("deselect", [])],
              "timeout_multiplier = 30.0", "timeout_constant = 20.0"]
    (copy / "setup.cfg").write_text("\n".join(lines) + "\n")


def collect(copy: Path, group: dict, equivalent: dict, only: list[str] | None = None) -> dict:
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415 (mutmut is only needed for this job)

    out = {}
    for module in group["mutate"]:
        meta_path = copy / "mutants" / (module + ".meta")
        if not meta_path.exists():
            out[module] = {"error": "no mutmut results"}
            continue
        meta = json.loads(meta_path.read_text())
        counts: dict[str, int] = {}
        survivors, stale = [], []
        for name, code in meta["exit_code_by_key"].items():
            if only and not any(fnmatch.fnmatch(name, pattern) for pattern in only):
                continue
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status == "survived":
                diff = subprocess.run(["mutmut", "show", name], cwd=copy, capture_output=True, text=True).stdout
                entry = equivalent.get(name)
                added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
                reason = entry["reason"] if entry and entry["mutated"] in added else None
                survivors.append({"mutant": name, "equivalent": reason, "diff": diff.strip()[-1500:]})
                if entry and reason is None:
                    stale.append(name)
        total = sum(counts.values())
        eq = sum(1 for s in survivors if s["equivalent"])
        detected = sum(n for s, n in counts.items() if s in DETECTED)
        out[module] = {"mutants": total, "counts": counts, "equivalent": eq,
                       "score": round(detected / max(1, total - eq), 4), "survivors": survivors,
                       "stale_equivalent_entries": stale}
    return out


def run_group(name: str, group: dict, timeout: int, only: list[str] | None = None) -> dict:
    eq_path = ROOT / "mutation" / "equivalent" / f"{name}.json"
    equivalent = json.loads(eq_path.read_text()) if eq_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix=f"mutmut-{name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "mutants", "__pycache__",
                                                                  ".pytest_cache", ".benchmarks", "bench_out"))
        write_config(copy, group)
        t0 = time.time()
        env = dict(os.environ, TRITON_INTERPRET="1", GEOALIGN_GUARD="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(["mutmut", "run", *(only or [])], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        result = {"group": name, "seconds": round(time.time() - t0), "returncode": proc.returncode,
                  "modules": collect(copy, group, equivalent, only)}
        if proc.returncode != 0:
            result["stdout"] = proc.stdout[-3000:]
            result["stderr"] = proc.stderr[-3000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="*", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per group")
    parser.add_argument("--mutants", nargs="*", help="run only these mutants (mutmut names, globs allowed); the "
                        "result then goes to mutation/results/<group>.partial.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from geoalign.atomic_files import write_json

    for name in args.group:
        result = run_group(name, GROUPS[name], args.timeout, args.mutants)
        suffix = ".partial.json" if args.mutants else ".json"
        write_json(ROOT / "mutation" / "results" / f"{name}{suffix}", result)
        for module, r in result["modules"].items():
            print(f"{name:>13} {module:<40} {r.get('score', r.get('error'))} {r.get('counts', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
