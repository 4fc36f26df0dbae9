"""Every public name renamed or moved by the structure passes still works for one release: reading it warns
(DeprecationWarning naming the new home) and gives the same object as the new home."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

#: (module, old name, new home "module:name")
MOVED = [
    ("geoalign.backends", "SparseBackend", "geoalign.backends.base:SparseBackend"),
    ("geoalign.backends", "TorchBackend", "geoalign.backends.torch_sparse:TorchBackend"),
    ("geoalign.geometry.frames", "FRAME_SAMPLING", "geoalign.geometry.sampling:FRAME_SAMPLING"),
    ("geoalign.modeling", "check_fits", "geoalign.model_config:check_fits"),
    ("geoalign.modeling", "forward_accepts", "geoalign.model_inputs:forward_accepts"),
    ("geoalign.model_cli", "FUSION_BACKENDS", "geoalign.backends.registry:ALL_BACKENDS"),
    ("geoalign.eval.predictor", "FUSION_BACKENDS", "geoalign.backends.registry:ALL_BACKENDS"),
]


@pytest.mark.parametrize("module, old, home", MOVED, ids=[f"{m}.{n}" for m, n, _ in MOVED])
def test_a_moved_name_warns_and_is_the_new_object(module, old, home):
    target, _, attr = home.partition(":")
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is deprecated; use {target}.{attr}"):
        got = getattr(importlib.import_module(module), old)
    assert got is getattr(importlib.import_module(target), attr)


def test_deprecated_functions_warn_and_keep_their_old_contract():
    from geoalign.backends import get_backend, get_sparse_backend
    from geoalign.model_cli import main

    with pytest.warns(DeprecationWarning, match="get_sparse_backend is deprecated"):
        assert get_sparse_backend("torch") is get_backend("torch", False)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown sparse backend 'reference'"):
        get_sparse_backend("reference")  # as before the reference became a backend object
    with pytest.warns(DeprecationWarning, match="model_cli.main is deprecated"):
        assert main(["answer", "--help"]) == 0


@pytest.mark.parametrize("old, new", [("geoalign.backends.cuda_extension", "geoalign_kernels.cuda.extension"),
                                      ("geoalign.backends.cuda_ops", "geoalign_kernels.cuda.ops")])
def test_moved_cuda_modules_warn_and_are_the_new_modules(old, new):
    """In a fresh interpreter (a module warns once, when first imported)."""
    code = (f"import warnings, importlib; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    importlib.import_module({old!r})\nexcept DeprecationWarning as e:\n    print('warned:', e)\n"
            f"warnings.simplefilter('ignore')\nimport {old} as a, {new} as b\n"
            f"shared = [n for n in dir(a) if not n.startswith('_') and hasattr(b, n) and callable(getattr(b, n))]\n"
            f"print('same' if shared and all(getattr(a, n) is getattr(b, n) for n in shared) else 'differ')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"warned: {old} moved to {new}" in out.stdout and out.stdout.strip().endswith("same"), out.stdout


def test_the_package_itself_imports_without_deprecation_warnings():
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                          "import geoalign, geoalign.modeling, geoalign.model_cli, geoalign.eval.predictor, "
                          "geoalign.geometry.frames, geoalign.backends, geoalign.fusion"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
