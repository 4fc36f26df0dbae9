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
    paths = sorted((ROOT / "kernels" / "geoalign_kernels").rglob("*.py"))
    assert any(p.parent.name == "cuda" for p in paths)        # the CUDA extension's loader and ops included
    for path in paths:
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


def _geoalign_import_graph() -> dict[str, set[str]]:
    """geoalign's modules -> the geoalign modules they import, at module level or inside functions (a deferred
    import is still a dependency); imports inside a module's ``__getattr__`` (a deprecated alias) do not count."""
    files = {}
    for path in (ROOT / "geoalign").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
                for n in ast.walk(f)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    deps.add(target if target in files else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_the_package_imports_have_no_circle():
    """No module of geoalign reaches itself through its imports (issue 30: modeling <-> processing <->
    serialization and fusion <-> progressive were circles)."""
    graph = _geoalign_import_graph()
    assert {"geoalign.modeling", "geoalign.fusion", "geoalign.progressive"} <= set(graph)
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):                      # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_backend_names_have_one_source():
    """geoalign/backends/registry.py is the only list of backend names: no other module of the package spells out
    two or more of them in a tuple, list, set or dict literal (keys), nor a benchmark three or more (a benchmark may
    pick two, e.g. the reference against torch), and everything that offers a choice reads the registry."""
    names = {"reference", "torch", "triton", "cuda"}
    paths = [*(ROOT / "geoalign").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    for path in sorted(paths):
        if path.name == "registry.py":
            continue
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and \
                    "# not backend names" not in lines[node.lineno - 1]:  # e.g. package versions keyed by name
                spelled = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
                most = 1 if path.is_relative_to(ROOT / "geoalign") else 2
                assert len(spelled) <= most, f"{path.relative_to(ROOT)}:{node.lineno} lists backend names {spelled}"
    from geoalign.backends import ALL_BACKENDS, SPARSE_BACKENDS, backend_class
    from geoalign.backends.registry import REGISTRY
    from geoalign.cli import build_parser

    assert ALL_BACKENDS == tuple(REGISTRY)
    assert set(SPARSE_BACKENDS) == {n for n, entry in REGISTRY.items() if entry.sparse}
    assert backend_class("torch").name == "torch" and backend_class("cuda").name == "cuda"
    sub = build_parser()._subparsers._group_actions[0].choices
    assert tuple(sub["answer"]._option_string_actions["--backend"].choices) == ALL_BACKENDS
    assert tuple(sub["eval"]._option_string_actions["--fusion-backend"].choices) == ALL_BACKENDS
