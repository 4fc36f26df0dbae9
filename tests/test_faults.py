"""Kill -9 at any moment loses nothing (geoalign/faults.py names the points): `geoalign train` killed at each named
point (and, in the slow test, at random times) and resumed with --resume latest until done ends bit-identical to an
uninterrupted run -- per-step losses, trained weights, optimizer state; `geoalign eval` killed mid-run and rerun
writes every answer exactly once, byte-equal to an uninterrupted run.

Each run is a fresh `python -m geoalign.cli` process on the tiny model (train_helpers.write_train_setup): 4 steps, a
checkpoint after every step.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geoalign.atomic_files import read_jsonl
from eval_helpers import make_vsibench
from train_helpers import write_train_setup

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _env(fault: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("GEOALIGN_FAULT", None)
    env.pop("TRITON_INTERPRET", None)
    if fault:
        env["GEOALIGN_FAULT"] = fault
    return env


def train(setup: Path, out: Path, *extra: str, fault: str | None = None, kill_after: float | None = None):
    """One `geoalign train` process; returns its exit status (-9 when killed). kill_after: SIGKILL it from here after
    that many seconds (if it is still running)."""
    cmd = [sys.executable, "-m", "geoalign.cli", "train", "--config", str(setup / "train.yaml"), "--output-dir",
           str(out), "--max-steps", str(STEPS), "--set", "save_steps=1", *extra]
    proc = subprocess.Popen(cmd, env=_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _out, err = proc.communicate(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"geoalign train failed (rc {proc.returncode}): {err[-3000:]}")
    return proc.returncode


def resume_until_done(setup: Path, out: Path, limit: int = 5) -> None:
    for _ in range(limit):
        if train(setup, out, "--resume", "latest") == 0:
            return
    raise AssertionError(f"not done after {limit} resumes")


def outcome(out: Path) -> dict:
    """What a finished run leaves: every logged loss per step, the last checkpoint's weights and optimizer state."""
    losses: dict[int, set] = {}
    for rec in read_jsonl(out / "train_log.jsonl"):
        if "loss" in rec:
            losses.setdefault(rec["step"], set()).add(rec["loss"])
    last = out / f"checkpoint-{STEPS}"
    return {"losses": losses, "weights": load_file(str(last / "model.safetensors")),
            "optimizer": torch.load(str(last / "optimizer.bin"), weights_only=True)}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    for step, values in got["losses"].items():      # a step run twice (killed before its checkpoint) logs twice
        assert values == want["losses"][step], (step, values, want["losses"][step])
    assert got["weights"].keys() == want["weights"].keys()
    for k in want["weights"]:
        assert torch.equal(got["weights"][k], want["weights"][k]), k
    a, b = got["optimizer"], want["optimizer"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in b["state"]:
        for k, v in b["state"][i].items():
            assert torch.equal(a["state"][i][k], v), (i, k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_train_setup(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The uninterrupted run's outcome, and how long it took (seconds, for the random kills)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    t0 = time.perf_counter()
    assert train(setup, out) == 0
    result = outcome(out)
    result["seconds"] = time.perf_counter() - t0
    return result


def kill_and_resume(setup, out, fault):
    assert train(setup, out, fault=fault) == -signal.SIGKILL, f"{fault} never fired"
    resume_until_done(setup, out)
    assert not [n for n in os.listdir(out) if n.startswith(".staging")], os.listdir(out)
    return outcome(out)


def test_killed_inside_a_checkpoint_save_resumes_bit_identical(setup, uninterrupted, tmp_path):
    """SIGKILL after checkpoint-2's state file is written, before its rename: checkpoint-2 never appears, the resume
    starts from checkpoint-1 and the run ends bit-identical."""
    assert_same(kill_and_resume(setup, tmp_path / "out", "checkpoint-state-written@2"), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["train-step@3", "checkpoint-files-written@2", "checkpoint-state-written@4",
                                   "checkpoint-committed@3", "train-step@1"])
def test_killed_at_each_named_point_resumes_bit_identical(setup, uninterrupted, tmp_path, fault):
    assert_same(kill_and_resume(setup, tmp_path / "out", fault), uninterrupted)


@pytest.mark.slow
def test_killed_between_the_renames_of_a_resave_resumes_bit_identical(setup, uninterrupted, tmp_path):
    """A re-save of a step (the newest checkpoint was damaged, so the resume went back one and saves that step
    again), killed after the old copy was moved aside and before the new one is in place."""
    out = tmp_path / "out"
    assert train(setup, out, fault="train-step@4") == -signal.SIGKILL          # checkpoints 1..3
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"damaged")
    assert train(setup, out, "--resume", "latest", fault="checkpoint-between-renames@1") == -signal.SIGKILL
    assert (out / ".staging-old-checkpoint-3").is_dir() and not (out / "checkpoint-3").exists()
    resume_until_done(setup, out)
    assert_same(outcome(out), uninterrupted)


@pytest.mark.slow
def test_killed_at_random_times_resumes_bit_identical(setup, uninterrupted, tmp_path):
    """Killed from outside at seeded random moments (10-90% of an uninterrupted run's time after each start, so
    inside start-up, steps and saves alike) until 4 kills have landed, then resumed to the end."""
    out, rng, kills = tmp_path / "out", random.Random(7), 0
    for _ in range(12):
        moment = rng.uniform(0.1, 0.9) * uninterrupted["seconds"]
        rc = train(setup, out, *(["--resume", "latest"] if out.exists() else []), kill_after=moment)
        kills += rc == -signal.SIGKILL
        if rc == 0 or kills == 4:
            break
    resume_until_done(setup, out)
    assert kills >= 3, f"only {kills} of the random kills landed before the run ended"
    assert_same(outcome(out), uninterrupted)


# ----------------------------------------------------------------------------------------------------- eval
def evaluate(data: str, out: Path, fault: str | None = None) -> int:
    cmd = [sys.executable, "-m", "geoalign.cli", "eval", "vsibench", "--data", data, "--predictor",
           "geoalign.eval.fake:FakePredictor", "--model", "x", "--out", str(out), "--batch-size", "2",
           "--no-progress", "--no-score"]
    r = subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-3000:]
    return r.returncode


def test_eval_killed_mid_run_writes_every_answer_once(tmp_path):
    data = make_vsibench(tmp_path / "vsi")
    assert evaluate(data, tmp_path / "full.jsonl") == 0
    out = tmp_path / "killed.jsonl"
    assert evaluate(data, out, fault="eval-answered@2") == -signal.SIGKILL
    assert 0 < len(out.read_text().splitlines()) < len((tmp_path / "full.jsonl").read_text().splitlines())
    assert evaluate(data, out) == 0
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------- several processes
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(args: list[str], fault: str | None = None) -> int:
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", *args], env=_env(fault),
                       capture_output=True, text=True, timeout=600)
    if fault is None:
        assert r.returncode == 0, r.stderr[-4000:]
    return r.returncode


def fsdp_train(setup: Path, out: Path, *extra: str, fault: str | None = None) -> int:
    return torchrun(["-m", "geoalign.training.cli", "--config", str(setup / "train.yaml"), "--output-dir", str(out),
                     "--max-steps", str(STEPS), "--set", "save_steps=1", "--set", "distributed=fsdp", "--set",
                     "save_final_model=true", *extra], fault=fault)


def fsdp_outcome(out: Path) -> dict:
    """Losses as logged, the final weights (gathered on rank 0) and each rank's sharded optimizer + model bytes."""
    losses: dict[int, set] = {}
    for rec in read_jsonl(out / "train_log.jsonl"):
        if "loss" in rec:
            losses.setdefault(rec["step"], set()).add(rec["loss"])
    shards = out / f"checkpoint-{STEPS}" / "fsdp"
    return {"losses": losses, "weights": load_file(str(out / "final" / "model.safetensors")),
            "shards": {n: (shards / n).read_bytes() for n in sorted(os.listdir(shards)) if n.endswith(".distcp")}}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_fsdp2_rank_killed_inside_a_checkpoint_resumes_bit_identical(setup, tmp_path):
    """2-process FSDP2 (gloo): rank 1 is killed while checkpoint-2 is being written (its shard files done, rank 0
    still at the barrier); torchrun stops the job; --resume latest (checkpoint-1) continues to the end. Losses, the
    gathered final weights and every rank's sharded model + optimizer bytes equal an uninterrupted 2-process run's."""
    full = tmp_path / "full"
    fsdp_train(setup, full)
    want = fsdp_outcome(full)
    out = tmp_path / "killed"
    assert fsdp_train(setup, out, fault="checkpoint-files-written@2:1") != 0
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1").is_dir()
    fsdp_train(setup, out, "--resume", "latest")
    got = fsdp_outcome(out)
    assert got["losses"] == want["losses"]
    for k in want["weights"]:
        assert torch.equal(got["weights"][k], want["weights"][k]), k
    assert got["shards"].keys() == want["shards"].keys() and len(want["shards"]) == 2
    for name in want["shards"]:
        assert got["shards"][name] == want["shards"][name], name


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")
def test_sharded_eval_with_a_rank_killed_writes_every_answer_once(tmp_path):
    data = make_vsibench(tmp_path / "vsi")
    assert evaluate(data, tmp_path / "full.jsonl") == 0
    out = tmp_path / "sharded.jsonl"
    args = ["-m", "geoalign.eval.cli", "eval", "vsibench", "--data", data, "--predictor",
            "geoalign.eval.fake:FakePredictor", "--model", "x", "--out", str(out), "--no-progress", "--no-score"]
    assert torchrun(args, fault="eval-answered@1:1") != 0
    torchrun(args)
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------------ full disk
FULL_DISK_SCRIPT = r'''
set -u
mount -t tmpfs -o size=2700k tmpfs "$MNT" || exit 77
py() { "$PYTHON" "$@"; }
# training: checkpoint-1 (1.7 MB) fits, checkpoint-2 does not
py -m geoalign.cli train --config "$SETUP/train.yaml" --output-dir "$MNT/run" --max-steps 4 --set save_steps=1 \
    > "$LOG/train.out" 2> "$LOG/train.err"; echo $? > "$LOG/train.rc"
py -c 'import json, os, sys; from geoalign.training import checkpoint as c; d = sys.argv[1]
json.dump({"valid": [s for s, _ in c.list_checkpoints(d)], "latest": c.resolve_resume("latest", d),
           "names": sorted(os.listdir(d))}, open(sys.argv[2], "w"))' "$MNT/run" "$LOG/train.json"
rm -rf "$MNT/run"
# predictions: a filler leaves room for a few answers only; then space is freed and the same command resumes
head -c 4096 /dev/zero > "$MNT/room"                       # one page, freed below: room for ~20 answers
dd if=/dev/zero of="$MNT/filler" bs=4096 2> /dev/null         # fills the rest (ends with ENOSPC)
rm "$MNT/room"
ARGS="eval vsibench --data $VSI --predictor geoalign.eval.fake:FakePredictor --model x --out $MNT/p.jsonl
      --batch-size 1 --no-progress --no-score"
py -m geoalign.cli $ARGS > "$LOG/eval1.out" 2> "$LOG/eval1.err"; echo $? > "$LOG/eval1.rc"
rm "$MNT/filler"
py -m geoalign.cli $ARGS > "$LOG/eval2.out" 2> "$LOG/eval2.err"; echo $? > "$LOG/eval2.rc"
cp "$MNT/p.jsonl" "$LOG/p.jsonl"
'''


def many_questions(folder: Path, n: int) -> str:
    """A VSI-Bench folder (eval_helpers.make_vsibench) whose test.jsonl repeats its questions under new ids, n in
    all."""
    data = make_vsibench(folder)
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    (folder / "test.jsonl").write_text("".join(json.dumps({**rows[i % len(rows)], "id": i}) + "\n" for i in range(n)))
    return data


def test_a_full_disk_is_one_clear_error_and_loses_nothing(setup, tmp_path):
    """On a 2.7 MB tmpfs (its own mount namespace; skipped where mounting is not allowed): training's second
    checkpoint does not fit -- one error naming the directory and the free bytes, checkpoint-1 stays valid and is
    what --resume latest takes, no staging directory is left; an eval of 120 questions with one page (4 KiB) left
    stops with one error once its predictions fill it, and after space is freed the same command completes the file,
    byte-equal to a run on a roomy disk (a line cut by the full disk is dropped and answered again)."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not found")
    data = many_questions(tmp_path / "vsi", 120)
    assert evaluate(data, tmp_path / "full.jsonl") == 0
    assert (tmp_path / "full.jsonl").stat().st_size > 3 * 4096      # more than the page left free
    log, mnt = tmp_path / "log", tmp_path / "mnt"
    log.mkdir()
    mnt.mkdir()
    env = dict(_env(), MNT=str(mnt), LOG=str(log), SETUP=str(setup), VSI=data, PYTHON=sys.executable)
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 77 or (r.returncode != 0 and "unshare" in r.stderr):
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-3000:]

    assert (log / "train.rc").read_text().strip() == "2", (log / "train.err").read_text()[-3000:]
    err = (log / "train.err").read_text().strip().splitlines()[-1]
    assert re.fullmatch(rf"geoalign train: error: \[Errno 28\] no space left to write checkpoint 2 into {mnt}/run "
                        rf"\([0-9]+ bytes free on its file system\): {mnt}/run/checkpoint-1 is intact; free some "
                        r"space and run again with --resume latest", err), err
    state = json.loads((log / "train.json").read_text())
    assert state["valid"] == [1] and state["latest"] == f"{mnt}/run/checkpoint-1"
    assert not [n for n in state["names"] if n.startswith(".staging")], state["names"]

    assert (log / "eval1.rc").read_text().strip() == "1", (log / "eval1.err").read_text()[-2000:]
    err = (log / "eval1.err").read_text().strip().splitlines()[-1]
    assert err.startswith(f"geoalign eval: error: [Errno 28] no space left to write records to {mnt}/p.jsonl: ") \
        and err.endswith(f"every answer written so far is kept in {mnt}/p.jsonl: run the same command again to "
                         "resume"), err
    assert (log / "eval2.rc").read_text().strip() == "0", (log / "eval2.err").read_text()[-2000:]
    assert (log / "p.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
