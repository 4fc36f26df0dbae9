"""`geoalign eval` sharded over 2 CPU processes by torchrun (the fake predictor): the merged predictions file equals a
1-process run's byte for byte, a failing rank fails the job with its error, and a rerun with another number of
processes resumes from the shards. The protocol's pieces are tested in-process in test_eval_runners.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from geoalign.eval import cli, runner

from eval_helpers import lines, make_vsibench

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not found")

FAILING = '''
import os
from geoalign.eval.fake import FakePredictor


def make(model_dir, **kwargs):
    """The fake predictor, crashing on its second question on rank 1 of a sharded run."""
    return FakePredictor(model_dir, fail_after=1 if os.environ.get("RANK") == "1" else None, **kwargs)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(VSI-Bench folder, folder of the failing predictor module, 1-process predictions file)."""
    root = tmp_path_factory.mktemp("dist_eval")
    data = make_vsibench(root / "vsi")
    (root / "failing.py").write_text(FAILING)
    one = str(root / "one" / "p.jsonl")
    assert cli.main(args(data, one)) == 0
    return data, str(root), one


def args(data, out, predictor="geoalign.eval.fake:FakePredictor"):
    return ["eval", "vsibench", "--data", data, "--predictor", predictor, "--model", "x", "--out", out,
            "--num-frames", "4", "--no-progress"]


def torchrun(n, cli_args, extra_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), extra_path, os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(k, None)
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={n}", "-m", "geoalign.eval.cli"] + cli_args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_one_process_file(setup, tmp_path):
    data, extra, one = setup
    out = str(tmp_path / "p.jsonl")
    r = torchrun(2, args(data, out), extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert open(out, "rb").read() == open(one, "rb").read()  # same records, same order
    assert "10 new predictions (0 already in" in r.stdout and "on 2 processes" in r.stdout
    assert runner.shard_files(out) == [] and runner.shard_files(out, "status.json") == []
    assert open(out[:-6] + ".scores.json").read() == open(one[:-6] + ".scores.json").read()


def test_a_failing_rank_fails_the_job_and_another_n_resumes(setup, tmp_path, capsys, monkeypatch):
    data, extra, one = setup
    out = str(tmp_path / "p.jsonl")
    r = torchrun(2, args(data, out, "failing:make"), extra)
    assert r.returncode != 0
    assert ("error: rank 1 of 2 failed: RuntimeError: FakePredictor: simulated crash; its answers so far are in "
            f"{runner.shard_path(out, 1, 2)}; run the same command again to resume") in r.stderr, r.stderr[-5000:]
    assert not os.path.exists(out)
    kept = {x["id"] for _, _, p in runner.shard_files(out) for x in lines(p)}
    assert "1" in kept and "3" not in kept  # rank 1 wrote its first answer only
    # one process finishes the job from the shards, answering only what is missing
    monkeypatch.syspath_prepend(extra)
    assert cli.main(args(data, out, "failing:make")) == 0
    assert f"{10 - len(kept)} new predictions ({len(kept)} already in" in capsys.readouterr().out
    assert open(out, "rb").read() == open(one, "rb").read()
    assert runner.shard_files(out) == [] and runner.shard_files(out, "status.json") == []
