"""The package's layering: the kernel package is a leaf, and every sparse backend is a SparseBackend."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_kernel_package_imports_only_torch_triton_and_itself():
    for path in sorted((ROOT / "kernels" / "geoalign_kernels").glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top != "geoalign", f"{path.name} imports {name}: geoalign_kernels must not depend on geoalign"


def test_backends_share_one_protocol():
    from geoalign.backends.base import SparseBackend
    from geoalign.backends.cuda_backend import CudaBackend
    from geoalign.backends.torch_sparse import TorchBackend

    assert issubclass(TorchBackend, SparseBackend) and issubclass(CudaBackend, SparseBackend)
    pytest.importorskip("triton")
    from geoalign.backends.triton_backend import TritonBackend

    assert issubclass(TritonBackend, SparseBackend)


def test_no_test_imports_another_test():
    for path in sorted((ROOT / "tests").glob("*.py")):
        for name in imported_modules(path):
            assert not name.startswith("test_"), f"{path.name} imports {name}; shared code belongs in helpers.py"
