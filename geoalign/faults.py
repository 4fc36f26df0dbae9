"""Named fault points, for the kill tests (tests/test_faults.py): with ``GEOALIGN_FAULT=NAME[@N][:RANK]`` in the
environment a process kills itself with SIGKILL the Nth time (default: the first) it passes the point NAME, on rank
RANK only when given (``RANK`` as torchrun sets it). Unset, a fault point is one dictionary lookup.

Points: ``train-step`` (after an optimizer step, before its log and checkpoint), ``checkpoint-files-written`` (every
rank's files are in the staging directory, before rank 0 commits), ``checkpoint-state-written`` (the state file is
written, before the rename), ``checkpoint-between-renames`` (re-saving a step: the old one is aside, the new one not
yet in place), ``checkpoint-committed`` (renamed into place, before old ones are pruned), ``eval-answered`` (a batch
of predictions appended).
"""
from __future__ import annotations

import os
import signal

POINTS = ("train-step", "checkpoint-files-written", "checkpoint-state-written", "checkpoint-between-renames",
          "checkpoint-committed", "eval-answered")
_passes: dict[str, int] = {}


def _spec() -> tuple[str, int, int | None] | None:
    text = os.environ.get("GEOALIGN_FAULT")
    if not text:
        return None
    name, _, rank = text.partition(":")
    name, _, count = name.partition("@")
    if name not in POINTS:
        raise ValueError(f"GEOALIGN_FAULT names an unknown fault point {name!r}; expected one of {POINTS}")
    return name, int(count or 1), int(rank) if rank else None


def fault_point(name: str) -> None:
    """SIGKILL this process here if GEOALIGN_FAULT says so (module docstring)."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return
    if spec[2] is not None and int(os.environ.get("RANK", "0")) != spec[2]:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == spec[1]:
        os.kill(os.getpid(), signal.SIGKILL)
