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

The state file is also the checkpoint's manifest: ``files`` maps every other file (relative path) to its size and
SHA-256, computed by rank 0 just before the state file is written. A resume verifies them first
(:func:`verify_checkpoint`): a file cut short by a copy, flipped bits or a missing file is one error naming the file,
and ``resume="latest"`` then falls back to the newest intact checkpoint, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

from ..atomic_files import fsync_dir, fsync_tree, write_json
from ..faults import fault_point

logger = logging.getLogger("geoalign.training")

STATE_FILE = "trainer_state.json"
SCHEDULER_JSON = "scheduler.json"              # the LR schedule of an FSDP2 run (the other modes: accelerate's)
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


def file_digest(path: str, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under ``directory`` but the state file."""
    out = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != STATE_FILE:
                out[rel] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    return dict(sorted(out.items()))


def verify_checkpoint(path: str) -> None:
    """Check every file the state file's manifest lists: present, of its size, with its SHA-256. Raises ValueError
    naming the first file that is not (a checkpoint written before manifests existed is accepted, with a warning)."""
    files = read_state(path).get("files")
    if files is None:
        logger.warning("checkpoint %s has no file manifest (written before geoalign 0.1.0 recorded one): its files "
                       "cannot be verified", path)
        return
    for rel, want in files.items():
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            raise ValueError(f"checkpoint file missing: {f}")
        size = os.path.getsize(f)
        if size != want["size"]:
            raise ValueError(f"checkpoint file damaged: {f} has {size} bytes, the manifest says {want['size']} "
                             "(cut short by a copy?)")
        if file_digest(f) != want["sha256"]:
            raise ValueError(f"checkpoint file damaged: {f} does not match its SHA-256 in {STATE_FILE} (changed "
                             "after it was written)")


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """None -> None; "latest" -> the newest valid checkpoint in output_dir whose files verify (None if there is none;
    a damaged newer one is skipped with a warning naming the damage); a path -> that checkpoint, which must be valid
    and verify (else ValueError naming the file)."""
    if not resume:
        return None
    if resume == "latest":
        for _step, path in reversed(list_checkpoints(output_dir)):
            try:
                verify_checkpoint(path)
            except (OSError, ValueError) as e:
                logger.warning("skipping damaged %s: %s; trying an older checkpoint", path, e)
                continue
            return path
        return None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume_from_checkpoint: {resume!r} is not a directory")
    if not is_valid_checkpoint(resume):
        raise ValueError(f"resume_from_checkpoint: {resume!r} is not a complete checkpoint (no {STATE_FILE} marked "
                         "complete, or not named checkpoint-<step>)")
    verify_checkpoint(resume)
    return resume


def read_json_state(path: str) -> dict:
    """A JSON object from a checkpoint file; ValueError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError as e:
        raise ValueError(f"checkpoint file {path} is not valid JSON: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {path} must hold a JSON object, got {type(state).__name__}")
    return state


def read_state(path: str) -> dict:
    return read_json_state(os.path.join(path, STATE_FILE))


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
    fsync_tree(stage)                        # every rank's files are on disk before they are hashed
    write_json(os.path.join(stage, STATE_FILE), dict(state, complete=True, step=int(step), files=manifest(stage)))
    fsync_tree(stage)
    fault_point("checkpoint-state-written")
    if os.path.exists(final):                 # re-saving a step: move the old one out of the way first
        old = os.path.join(output_dir, f"{STAGING_PREFIX}old-{PREFIX}{int(step)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
        fsync_dir(output_dir)
        fault_point("checkpoint-between-renames")
        os.rename(stage, final)
        fsync_dir(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, final)
        fsync_dir(output_dir)
    fault_point("checkpoint-committed")
    if save_total_limit:
        ckpts = list_checkpoints(output_dir)
        for _, path in ckpts[:max(0, len(ckpts) - save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(output_dir):       # leftovers of crashed saves
        if name.startswith(STAGING_PREFIX) and name != os.path.basename(stage):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return final
