"""The import hook behind geoalign.vllm.torchvision_cpu (see there); imported by its .pth line at start-up, so it
imports nothing heavy until torchvision is being imported."""
from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
_LIBRARY = []  # keeps the torch.library.Library alive (its definitions go with it)


def define_missing_ops() -> bool:
    """Define torchvision::nms / qnms (schemas only) when torchvision's C extension did not load and they are
    absent. Returns True when it defined them."""
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():
        return False
    missing = {n: s for n, s in _SCHEMAS.items() if not _op_exists(f"torchvision::{n}")}
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing.values():
        lib.define(schema)
    _LIBRARY.append(lib)
    return True


def _op_exists(qualname: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


class _BeforeMetaRegistrations(importlib.abc.MetaPathFinder):
    """Runs :func:`define_missing_ops` once, when ``torchvision._meta_registrations`` is about to be imported
    (torchvision's ``__init__`` has loaded ``torchvision.extension`` by then); finds nothing itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None


def install_hook() -> None:
    """Install the import hook in this process (what the .pth line does), unless torchvision is already imported."""
    import os

    if os.environ.get("GEOALIGN_TORCHVISION_HOOK", "1") == "0":
        return
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMetaRegistrations())
