"""geoalign.training.checkpoint on its own, without a trainer: names, validity, the state file, re-saving a step,
pruning, and the clean-up of crashed saves, including a crash between the two renames of a re-save and files that
cannot be deleted (NFS keeps a ``.nfsXXXX`` file for a file another process still holds open; unlinking it fails with
EBUSY). The whole-trainer paths (resume, a staging directory left by a crash) are tests/test_train_loop.py; an
interrupted trainer_state.json write is tests/test_atomic_files.py::test_training_checkpoint."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from geoalign.training import checkpoint as ckpt


def save(out, step: int, files: dict, state: dict | None = None, limit: int | None = None) -> str:
    """One rank-0 save as the trainer does it: begin, write the files into the stage, commit."""
    stage = ckpt.begin(str(out), step, True)
    for name, text in files.items():
        Path(stage, name).write_text(text)
    return ckpt.commit(str(out), step, state if state is not None else {"global_step": step}, limit)


def hidden(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("."))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The working directory moved to an empty folder apart from the run: nothing may be written there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def busy_nfs_files(monkeypatch):
    """Unlinking any file named .nfs* fails with EBUSY, as on NFS while another process holds the file open."""
    real_unlink = os.unlink

    def unlink(path, *, dir_fd=None):
        if os.path.basename(os.fspath(path)).startswith(".nfs"):
            raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(path))
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)


# ------------------------------------------------------------------------------------------------------- names
def test_staging_dir_is_inside_the_output_dir(tmp_path, elsewhere):
    out = tmp_path / "run"
    assert ckpt.staging_dir("/runs/a", 7) == os.path.join("/runs/a", ".staging-checkpoint-7")
    assert ckpt.checkpoint_dir("/runs/a", 7) == os.path.join("/runs/a", "checkpoint-7")
    stage = ckpt.begin(str(out), 7, True)
    assert stage == str(out / ".staging-checkpoint-7") and os.path.isdir(stage)
    assert hidden(out) == [".staging-checkpoint-7"] and os.listdir(elsewhere) == []


@pytest.mark.parametrize("name", ["final", "checkpoint-", "checkpoint-7-old", "checkpoint-x", "backup-checkpoint-7"])
def test_a_complete_state_under_another_name_is_not_a_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 7, "step": 7, "complete": True}))
    assert ckpt.is_valid_checkpoint(str(path)) is False
    assert ckpt.list_checkpoints(str(tmp_path)) == [] and ckpt.latest_checkpoint(str(tmp_path)) is None
    message = (f"resume_from_checkpoint: {str(path)!r} is not a complete checkpoint (no trainer_state.json marked "
               "complete, or not named checkpoint-<step>)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ckpt.resolve_resume(str(path), str(tmp_path))


def test_validity_needs_complete_true(tmp_path):
    for step, state in [(1, {"complete": True}), (2, {"complete": False}), (3, {"global_step": 3}), (4, None)]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text('{"complete": tr')  # cut short
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [1]
    assert ckpt.is_valid_checkpoint(str(tmp_path / "checkpoint-1") + os.sep)  # a trailing slash is fine


# -------------------------------------------------------------------------------------------------- the state
def test_commit_writes_the_state_with_complete_and_step(tmp_path):
    out = tmp_path / "run"
    # a stale "complete"/"step" in the caller's state is overridden by the commit's own
    path = save(out, 12, {"model.safetensors": "w12"}, {"global_step": 12, "seed": 3, "complete": False, "step": 1})
    assert path == str(out / "checkpoint-12")
    manifest = {"model.safetensors": {"size": 3, "sha256": hashlib.sha256(b"w12").hexdigest()}}
    assert ckpt.read_state(path) == {"global_step": 12, "seed": 3, "complete": True, "step": 12, "files": manifest}
    assert ckpt.resolve_resume("latest", str(out)) == path and ckpt.resolve_resume(path, str(out)) == path
    assert sorted(os.listdir(path)) == ["model.safetensors", "trainer_state.json"] and hidden(out) == []


# ------------------------------------------------------------------------------------------- re-saving a step
def test_resaving_a_step_replaces_it_whole(tmp_path, elsewhere):
    out = tmp_path / "run"
    save(out, 2, {"model.safetensors": "w2"})
    save(out, 3, {"model.safetensors": "first", "optimizer.bin": "o-first"}, {"global_step": 3, "try": 1})
    path = save(out, 3, {"model.safetensors": "second"}, {"global_step": 3, "try": 2})
    assert path == str(out / "checkpoint-3")
    assert sorted(os.listdir(path)) == ["model.safetensors", "trainer_state.json"]  # no stale optimizer.bin
    assert Path(path, "model.safetensors").read_text() == "second"
    state = ckpt.read_state(path)
    assert state.pop("files") == {"model.safetensors": {"size": 6, "sha256": hashlib.sha256(b"second").hexdigest()}}
    assert state == {"global_step": 3, "try": 2, "complete": True, "step": 3}
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 3] and hidden(out) == []
    assert os.listdir(elsewhere) == []


def test_resave_clears_the_leftover_of_an_earlier_crashed_resave(tmp_path):
    out = tmp_path / "run"
    save(out, 3, {"model.safetensors": "first"})
    stale = out / ".staging-old-checkpoint-3"  # where a crashed re-save had moved an older checkpoint-3
    stale.mkdir()
    (stale / "model.safetensors").write_text("older")
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 3, "complete": True, "step": 3}))
    path = save(out, 3, {"model.safetensors": "second"})
    assert Path(path, "model.safetensors").read_text() == "second" and hidden(out) == []


def crash_resave_before_the_stage_rename(monkeypatch, out, step: int, limit: int | None = None) -> None:
    """Re-save ``step`` with the process dying between its two renames: the old checkpoint is already aside, the
    new stage never reaches its final name."""
    stage = ckpt.begin(str(out), step, True)
    Path(stage, "model.safetensors").write_text("second")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == stage:
            raise OSError(errno.EIO, "Input/output error (injected: the process dies before the stage is renamed)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        ckpt.commit(str(out), step, {"global_step": step}, save_total_limit=limit)
    monkeypatch.setattr(os, "rename", real_rename)


def test_crash_between_the_renames_of_a_resave_keeps_the_old_copy_in_the_run(tmp_path, elsewhere, monkeypatch):
    """Re-saving checkpoint-3: the old one is renamed aside inside the output directory (same file system, so the
    rename is atomic and the copy is found by the clean-up), then the stage is renamed into place. A crash between
    the two leaves the old checkpoint-3 aside in the run, still step 3's checkpoint (the newest one to resume from,
    even with save_total_limit=1), and the next save renames it back."""
    out = tmp_path / "run"
    save(out, 2, {"model.safetensors": "w2"})
    save(out, 3, {"model.safetensors": "first"})
    crash_resave_before_the_stage_rename(monkeypatch, out, 3)
    aside = out / ".staging-old-checkpoint-3"
    assert (aside / "model.safetensors").read_text() == "first" and os.listdir(elsewhere) == []
    assert ckpt.latest_checkpoint(str(out)) == str(aside)
    assert ckpt.resolve_resume("latest", str(out)) == str(aside) == ckpt.resolve_resume(str(aside), str(out))
    save(out, 4, {"model.safetensors": "w4"})
    assert hidden(out) == [] and [s for s, _ in ckpt.list_checkpoints(str(out))] == [2, 3, 4]
    assert (out / "checkpoint-3" / "model.safetensors").read_text() == "first"


def test_a_crashed_resave_with_save_total_limit_1_still_leaves_a_checkpoint(tmp_path, elsewhere, monkeypatch):
    out = tmp_path / "run"
    save(out, 3, {"model.safetensors": "first"}, limit=1)
    crash_resave_before_the_stage_rename(monkeypatch, out, 3, limit=1)
    latest = ckpt.latest_checkpoint(str(out))
    assert latest is not None and Path(latest, "model.safetensors").read_text() == "first"


def test_a_state_file_that_is_not_an_object_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-5"
    path.mkdir()
    for text in ("[1, 2]", "true", "\"complete\""):
        (path / "trainer_state.json").write_text(text)
        assert ckpt.is_valid_checkpoint(str(path)) is False


# -------------------------------------------------------------------------------------- pruning and clean-up
def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    for step in (5, 10, 15, 20):
        save(out, step, {"model.safetensors": f"w{step}"}, limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [15, 20]
    assert sorted(os.listdir(out)) == ["checkpoint-15", "checkpoint-20"]


def test_commit_removes_leftovers_of_crashed_saves_but_keeps_checkpoints(tmp_path):
    out = tmp_path / "run"
    save(out, 2, {"model.safetensors": "w2"})
    for name in (".staging-checkpoint-5", ".staging-old-checkpoint-2"):
        (out / name).mkdir()
        (out / name / "model.safetensors").write_text("garbage")
    (out / "notes.txt").write_text("user file")  # not ours: left alone
    path = save(out, 6, {"model.safetensors": "w6"})
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-6", "notes.txt"]
    assert Path(path, "model.safetensors").read_text() == "w6"


def test_an_undeletable_file_in_a_pruned_checkpoint_does_not_fail_the_save(tmp_path, busy_nfs_files):
    out = tmp_path / "run"
    save(out, 1, {"model.safetensors": "w1", ".nfs0000000000a1": "held open by another rank"})
    path = save(out, 2, {"model.safetensors": "w2"}, limit=1)
    assert path == str(out / "checkpoint-2") and Path(path, "model.safetensors").read_text() == "w2"
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]
    assert os.listdir(out / "checkpoint-1") == [".nfs0000000000a1"]  # all the rest is gone


def test_an_undeletable_file_in_a_leftover_stage_does_not_fail_the_save(tmp_path, busy_nfs_files):
    out = tmp_path / "run"
    (out / ".staging-checkpoint-5").mkdir(parents=True)
    (out / ".staging-checkpoint-5" / ".nfs0000000000b2").write_text("held open")
    (out / ".staging-checkpoint-5" / "model.safetensors").write_text("garbage")
    path = save(out, 6, {"model.safetensors": "w6"})
    assert ckpt.latest_checkpoint(str(out)) == path
    assert os.listdir(out / ".staging-checkpoint-5") == [".nfs0000000000b2"]


def test_an_undeletable_file_in_a_replaced_checkpoint_does_not_fail_the_resave(tmp_path, busy_nfs_files):
    out = tmp_path / "run"
    save(out, 3, {"model.safetensors": "first", ".nfs0000000000c3": "held open"})
    path = save(out, 3, {"model.safetensors": "second"})
    assert Path(path, "model.safetensors").read_text() == "second"
    assert sorted(os.listdir(path)) == ["model.safetensors", "trainer_state.json"]
    assert os.listdir(out / ".staging-old-checkpoint-3") == [".nfs0000000000c3"]


def test_a_checkpoint_wins_over_an_aside_copy_of_the_same_step(tmp_path, monkeypatch):
    """Both checkpoint-3 and a leftover aside copy of step 3 (its re-save finished, the clean-up did not): the
    checkpoint is the step's, whichever order the directory lists them in."""
    out = tmp_path / "run"
    save(out, 3, {"model.safetensors": "new"})
    aside = out / ".staging-old-checkpoint-3"
    aside.mkdir()
    (aside / "trainer_state.json").write_text(json.dumps({"global_step": 3, "complete": True, "step": 3}))
    real = os.listdir
    for reverse in (False, True):
        monkeypatch.setattr(os, "listdir", lambda path, r=reverse: sorted(real(path), reverse=r))
        assert ckpt.list_checkpoints(str(out)) == [(3, str(out / "checkpoint-3"))]
