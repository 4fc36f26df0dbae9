"""bench/gpu_proof.py (issue 14) on the CPU: the dry run goes through every stage at tiny shapes (so the script
cannot rot between GPU sessions), and a stage that fails or hangs is recorded while the run goes on."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_proof(out: Path, *args, env_extra=None, timeout=900) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_proof", str(out), "--dry-run", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_proof.json").read_text())


def test_dry_run_goes_through_every_stage(tmp_path):
    out = tmp_path / "proof"
    report = run_proof(out, "--total-s", "1200", "--stage-s", "400")
    stages = report["stages"]
    assert list(stages) == ["ceilings", "parity", "fusion", "tune", "encoder", "training", "compiled", "pytest"]
    assert report["plan"]["fits"] and report["plan"]["spare_s"] >= 60  # the measured plan (bench/proof_plan.py)
    assert all(isinstance(r["triton_builds"], int) for r in stages.values())
    log = (out / "gpu_proof.log").read_text()
    for name, r in stages.items():
        assert r["status"] == "ok", (name, r.get("error"), log[-3000:])
    assert stages["ceilings"]["matmul_tflops"] > 0 and stages["ceilings"]["copy_gbs"] > 0
    # parity: triton (interpreter) and torch compared per tensor with the fp32 reference; cuda says why not
    parity = stages["parity"]["parity"]
    assert parity["triton"]["passed"] is True and parity["torch"]["passed"] is True
    assert parity["cuda"]["passed"] is None and "CPU build" in parity["cuda"]["skipped"]
    errs = parity["triton"]["cases"]["small_odd"]["rel_err"]
    for key in ("q_hat", "dq", "d_projector.fc1.weight", "d_layer_norms.0.weight", "d_layer_norms.2.bias",
                "d_router.fc2.weight", "d_out_proj.weight"):
        assert errs[key] < 1e-4, (key, errs[key])  # fp32 against fp32: rounding only
    assert max(errs.values()) > 0  # a real comparison of two computations, not of one tensor with itself
    assert parity["triton"]["cases"]["dry_1_frame"]["topk_agreement"] == 1.0
    # fusion table: each backend in the bench row format, with ratios against reference from the same run
    rows = stages["fusion"]["rows"]
    fwdbwd = {r["backend"]: r for r in rows if r["mode"] == "fwdbwd"}
    assert set(fwdbwd) == {"reference", "torch", "triton"}
    assert all(r["median_ms"] > 0 and r["L"] == 252 for r in fwdbwd.values())
    assert math.isclose(fwdbwd["reference"]["speedup_vs_reference"], 1.0)
    assert "skipped" in stages["fusion"]["kernels"]  # per-kernel device time needs CUDA
    enc = {(r["backend"], r["mode"]) for r in stages["encoder"]["rows"]}
    assert enc == {(b, m) for b in ("vggt-list+torch", "vggt-stream+torch") for m in ("infer", "fwdbwd")}
    train = stages["training"]["train"]
    assert train["finite"] and len(train["losses"]) == 2
    assert stages["training"]["generate"]["sdpa"]["generated_shape"][0] == 2
    assert stages["training"]["generate"]["sdpa"]["finite"]
    assert "CUDA" in stages["tune"]["skipped"] and "CUDA" in stages["compiled"]["skipped"]
    assert stages["pytest"]["summary"].count("collected") == 2
    # what comes back from the device tool: at most 8 files, no folders
    files = sorted(p.name for p in out.iterdir())
    assert files == ["encoder.png", "fusion.png", "gpu_proof.json", "gpu_proof.log"], files


@pytest.mark.slow  # ~1 min on 2 cores; the dry run above keeps the script's plumbing in the default run
def test_a_failing_or_hanging_stage_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "proof"
    report = run_proof(out, "--stages", "ceilings", "parity", "fusion", "--stage-s", "30",
                       env_extra={"GEOALIGN_PROOF_FAULT": "parity:hang,fusion:fail"})
    stages = report["stages"]
    assert stages["ceilings"]["status"] == "ok"
    assert stages["parity"]["status"] == "timeout" and stages["parity"]["before_hang"] is True
    assert "budget" in stages["parity"]["error"]
    assert stages["fusion"]["status"] == "failed" and "fault injected" in stages["fusion"]["error"]
    assert "finished" in report


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_stage_children_die_with_the_run(tmp_path, sig):
    """A SIGTERM to the run (a caller's timeout) takes the running stage's process group down with it; a SIGKILL,
    which no handler sees, still takes the stage child (PR_SET_PDEATHSIG)."""
    import signal
    import time

    out = tmp_path / "proof"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), GEOALIGN_PROOF_FAULT="ceilings:hang")
    parent = subprocess.Popen([sys.executable, "-m", "bench.gpu_proof", str(out), "--dry-run", "--stages",
                               "ceilings", "--stage-s", "300"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    marker = "--child ceilings"
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline:
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        continue
                    if marker in cmd and str(out) in cmd:
                        child = int(pid)
            time.sleep(0.2)
        assert child is not None, "the stage child never started"
        time.sleep(1.0)
        signum = getattr(signal, sig)
        parent.send_signal(signum)
        parent.wait(timeout=60)
        assert parent.returncode == (128 + signum if sig == "SIGTERM" else -signum)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}").exists() else "X"
            if state == "Z":  # reaped by init soon; a zombie runs nothing
                break
            time.sleep(0.2)
        alive = Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z"
        assert not alive, "the stage child outlived the run"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None:
            try:
                os.kill(child, 9)
            except OSError:
                pass


STUB_PYTHON = """#!/usr/bin/env bash
# a stand-in python for bench/gpu_proof.sh: records each call; the precompile and the stage runner sleep a marked
# while (STUB_SLEEP seconds) so that a test can find them
echo "$*" >> "$STUB_LOG"
case "$*" in
  *"-m pip"*) exit 0 ;;
  "-c "*) exit 3 ;;
  *"bench.proof_plan precompile"*|*"bench.gpu_proof"*) sleep "${STUB_SLEEP:-0}.0421"; exit 0 ;;
esac
exit 0
"""


def _run_script(tmp_path, *args, sleep=0, background=False):
    import shutil

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), STUB_SLEEP=str(sleep),
               TRITON_CACHE_DIR=str(tmp_path / "cache"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    cmd = [shutil.which("bash"), str(ROOT / "bench" / "gpu_proof.sh"), *args]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120), log


def test_the_script_reads_its_arguments_in_any_order_and_refuses_bad_ones(tmp_path):
    out = tmp_path / "out"
    proc, log = _run_script(tmp_path, str(out), "--skip-cuda")  # the flag where TOTAL_SECONDS would be
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    runner = [c for c in calls if c.startswith("-m bench.gpu_proof")]
    assert len(runner) == 1 and 500 <= int(runner[0].split("--total-s ")[1]) <= 520, calls
    assert not any(c.startswith("-c ") for c in calls), "--skip-cuda must not build csrc/"
    assert "--skip-cuda: the cuda backend is skipped" in (out / "gpu_proof.log").read_text()
    proc, log = _run_script(tmp_path, "--skip-cuda", str(out), "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 280 <= int(log.read_text().splitlines()[-1].split("--total-s ")[1]) <= 300
    for bad, message in ((["OUT", "abc"], "TOTAL_SECONDS must be a whole number"),
                         (["OUT", "--fast"], "unknown option"), ([], "usage"), (["OUT", "30"], ">= 60")):
        proc, _ = _run_script(tmp_path, *bad)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def test_the_script_skips_cuda_by_itself_without_nvcc(tmp_path, monkeypatch):
    import shutil

    # a PATH with bash and coreutils but no nvcc (this machine has one in /usr/local/bin)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "date", "mkdir", "timeout", "nproc", "tee", "cat", "rm", "sleep", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "out"
    proc, log = _run_script(tmp_path, str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvcc or ninja is missing: the cuda backend is skipped" in proc.stdout
    assert not any(c.startswith("-c ") for c in log.read_text().splitlines())


def test_a_sigterm_to_the_script_stops_everything_it_started(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    proc, log = _run_script(tmp_path, str(out), "--skip-cuda", sleep=97, background=True)

    def marked():
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if "97.0421" in cmd and state != "Z":
                    found.append(int(pid))
        return found

    try:
        deadline = time.monotonic() + 60
        while not marked() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marked(), "the precompile stand-in never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 143
        deadline = time.monotonic() + 15
        while marked() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not marked(), "a child of the script outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in marked():
            os.kill(pid, 9)
