"""mutation/triton_planted.py stays applicable: every planted bug's text occurs exactly once in the current kernel
sources, and its edit changes them. (An edit to a kernel line that a planted bug targets would otherwise turn that
bug into an "error" of the slow planted-bug job, noticed only when the job is next run.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _planted() -> dict:
    spec = importlib.util.spec_from_file_location("triton_planted", ROOT / "mutation" / "triton_planted.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PLANTED


def test_every_planted_bug_matches_its_kernel_text_once():
    planted = _planted()
    assert len(planted) >= 30
    for name, (file, old, new, _what) in planted.items():
        source = (ROOT / "kernels" / "geoalign_kernels" / file).read_text()
        assert source.count(old) == 1, (name, file, source.count(old))
        assert new != old, name
