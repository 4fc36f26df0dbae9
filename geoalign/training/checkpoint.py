"""Atomic training checkpoints.

A checkpoint is the directory ``<output_dir>/checkpoint-<step>``. It is written into a hidden staging directory
``<output_dir>/.staging-checkpoint-<step>`` by every rank (accelerate's ``save_state``: model, optimizer, scheduler,
RNG states; plus ``trainer_state.json``, written last), every file is fsync'ed, and rank 0 then ``os.rename`` s the
staging directory into place and fsyncs ``output_dir``. A checkpoint is valid iff its name is ``checkpoint-<step>``
and it holds a ``trainer_state.json`` whose ``complete`` is true; a crash at any moment leaves either the previous
valid checkpoints or a staging directory that is ignored (and cleaned up on the next save). Re-saving a step moves the existing
``checkpoint-<step>`` aside to ``.staging-old-checkpoint-<step>`` first; a crash between that rename and the next
leaves the aside copy, which still counts as that step's checkpoint (latest_checkpoint finds it) and is renamed
back by the next save, so even save_total_limit=1 always leaves one to resume from. Needs a file system
shared by all ranks (the usual set-up for multi-node training too).
"""
from __future__ import annotations

import json
import os
import re
import shutil

from ..atomic_files import fsync_dir, fsync_tree, write_json

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_ASIDE = re.compile(r"^\.staging-old-checkpoint-(\d+)$")  # a checkpoint moved aside by a re-save that crashed


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}{int(step)}")


def staging_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{STAGING_PREFIX}{PREFIX}{int(step)}")


def is_valid_checkpoint(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    if not (_NAME.match(name) or _ASIDE.match(name)):
        return False
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and bool(state.get("complete"))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Valid checkpoints under ``output_dir``, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found: dict = {}
    for name in os.listdir(output_dir):
        m = _NAME.match(name) or _ASIDE.match(name)
        path = os.path.join(output_dir, name)
        if m and is_valid_checkpoint(path):
            step = int(m.group(1))
            if step not in found or _NAME.match(name):  # checkpoint-<step> wins over an aside copy
                found[step] = path
    return sorted(found.items())


def _restore_asides(output_dir: str) -> None:
    """Rename back the checkpoints a crashed re-save left aside (their checkpoint-<step> is missing)."""
    for name in os.listdir(output_dir):
        m = _ASIDE.match(name)
        if m and is_valid_checkpoint(os.path.join(output_dir, name)):
            final = checkpoint_dir(output_dir, int(m.group(1)))
            if not os.path.exists(final):
                os.rename(os.path.join(output_dir, name), final)
                fsync_dir(output_dir)


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """None -> None; "latest" -> the newest valid checkpoint in output_dir (None if there is none); a path -> that
    checkpoint (it must be valid)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume_from_checkpoint: {resume!r} is not a directory")
    if not is_valid_checkpoint(resume):
        raise ValueError(f"resume_from_checkpoint: {resume!r} is not a complete checkpoint (no {STATE_FILE} marked "
                         "complete, or not named checkpoint-<step>)")
    return resume


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def begin(output_dir: str, step: int, is_main: bool) -> str:
    """Rank 0 clears a stale staging directory for this step; returns the staging path (call a barrier after)."""
    stage = staging_dir(output_dir, step)
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(stage):
            shutil.rmtree(stage)
        os.makedirs(stage)
    return stage


def commit(output_dir: str, step: int, state: dict, save_total_limit: int | None = None) -> str:
    """Rank 0, after every rank has written into the staging directory (barrier first): write the state file,
    fsync, rename into place, fsync the parent, prune old checkpoints. Returns the checkpoint path."""
    stage = staging_dir(output_dir, step)
    final = checkpoint_dir(output_dir, step)
    _restore_asides(output_dir)
    write_json(os.path.join(stage, STATE_FILE), dict(state, complete=True, step=int(step)))
    fsync_tree(stage)
    if os.path.exists(final):                 # re-saving a step: move the old one out of the way first
        old = os.path.join(output_dir, f"{STAGING_PREFIX}old-{PREFIX}{int(step)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
        fsync_dir(output_dir)
        os.rename(stage, final)
        fsync_dir(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, final)
        fsync_dir(output_dir)
    if save_total_limit:
        ckpts = list_checkpoints(output_dir)
        for _, path in ckpts[:max(0, len(ckpts) - save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(output_dir):       # leftovers of crashed saves
        if name.startswith(STAGING_PREFIX) and name != os.path.basename(stage):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return final
