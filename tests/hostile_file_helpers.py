"""Hostile files for the safe-loading tests: a pickle that runs code when loaded, a torch file holding one, and a
checkpoint manifest resealed after its files were tampered with (as an attacker would)."""
from __future__ import annotations

import json
import os

import torch


class CodeOnLoad:
    """An object whose pickle runs ``touch MARKER`` when unpickled with arbitrary globals (os.system): what a hostile
    checkpoint file would hold. Safe loaders must refuse it without creating the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def hostile_torch_file(path, marker) -> None:
    """``torch.save`` of a dict holding a CodeOnLoad (torch's format, as accelerate's .bin / .pkl files are)."""
    torch.save({"state": CodeOnLoad(marker), "x": torch.zeros(2)}, str(path))


def reseal_checkpoint(path) -> None:
    """Recompute the manifest of a checkpoint's state file after files in it were replaced: a tampered checkpoint
    whose manifest is consistent (an attacker can compute SHA-256), so only the safe loaders stand in the way."""
    from geoalign.training import checkpoint as ckpt

    state_file = os.path.join(str(path), ckpt.STATE_FILE)
    with open(state_file) as f:
        state = json.load(f)
    state["files"] = ckpt.manifest(str(path))
    with open(state_file, "w") as f:
        json.dump(state, f)
