"""The README's layout table matches the tree, docs/architecture.md exists and is what the code cites, and every
package name or repository path that code and docs mention exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout"):]


def test_every_module_is_in_the_layout_table():
    text = layout_section()
    names = [p.name for p in (ROOT / "geoalign").glob("*.py") if p.name != "__init__.py"]
    names += [p.name for p in (ROOT / "geoalign").iterdir() if p.is_dir() and not p.name.startswith("__")]
    names += [p.name for p in (ROOT / "geoalign" / "backends").glob("*.py") if p.name != "__init__.py"]
    names += [p.name for p in (ROOT / "geoalign" / "training").glob("*.py")
              if p.name not in ("__init__.py", "synthetic.py")]
    names += [p.name for p in (ROOT / "kernels" / "geoalign_kernels").glob("*.py") if p.name != "__init__.py"]
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"README's Layout table does not mention {missing}"


def test_every_path_in_the_layout_table_exists():
    paths = re.findall(r"^\| `([^`]+/)`", layout_section(), re.M)
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), path


def test_design_citations_point_inside_the_repository():
    assert (ROOT / "docs" / "architecture.md").is_file()
    offenders = []
    for base in ("geoalign", "kernels", "bench", "csrc", "tests"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix in (".py", ".cu", ".cuh", ".cpp", ".h") and path.name != "test_docs.py" \
                    and "design.md" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"cite docs/architecture.md, not design.md: {offenders}"


#: dotted names that are not Python attributes: torch.ops namespaces (torch.ops.geoalign.<op>), mutation-testing
#: mutant ids quoted in the README, and the optional CUDA extension (built only where a CUDA toolkit is present)
NOT_ATTRIBUTES = re.compile(r"__mutmut_|^geoalign_kernels\._cuda_ops$")
DOTTED = re.compile(r"(?<![\w.])((?:geoalign|geoalign_kernels)(?:\.[A-Za-z_]\w*)+)")
SOURCES = ("README.md", "docs", "geoalign", "kernels", "bench", "csrc", "tests", "configs", ".ci")
SUFFIXES = (".py", ".md", ".cu", ".cuh", ".cpp", ".h", ".sh", ".yaml")


def named_in_sources(pattern: re.Pattern) -> dict[str, list[str]]:
    """{reference: ["file:line", ...]} for every match of ``pattern`` in the repository's code and docs."""
    found: dict[str, list[str]] = {}
    for base in SOURCES:
        root = ROOT / base
        for path in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if path.suffix not in SUFFIXES or "results" in path.parts or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for match in pattern.finditer(line):
                    found.setdefault(match.group(1).rstrip("."), []).append(
                        f"{path.relative_to(ROOT)}:{number}")
    return found


def resolves(reference: str) -> bool:
    """Whether a dotted name is a module, or an attribute path below the longest importable module prefix."""
    import importlib.util
    import warnings

    parts = reference.split(".")
    for n in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec(".".join(parts[:n])) is None:
                continue
        except ImportError:
            continue
        if n == len(parts):
            return True
        with warnings.catch_warnings():  # deprecated aliases still resolve (their own messages name them)
            warnings.simplefilter("ignore", DeprecationWarning)
            obj = importlib.import_module(".".join(parts[:n]))
            for attribute in parts[n:]:
                if not hasattr(obj, attribute):
                    return False
                obj = getattr(obj, attribute)
        return True
    return False


def test_every_dotted_geoalign_name_in_code_and_docs_resolves():
    """A docstring, comment or doc naming geoalign.<module>.<name> or geoalign_kernels.<module>.<name> names something that exists, so a
    move or rename cannot leave a stale pointer behind (issue 30 found three)."""
    stale = {ref: where[:3] for ref, where in named_in_sources(DOTTED).items()
             if not NOT_ATTRIBUTES.search(ref) and not resolves(ref)}
    assert not stale, f"names that no longer exist: {stale}"


def test_every_repository_path_in_code_and_docs_exists():
    """The same for paths such as geoalign/loading.py or kernels/geoalign_kernels/cuda/ops.py (globs, {a,b} sets and
    results folders are skipped; the files the docs name that are outputs, or must not exist, are listed)."""
    not_in_the_tree = {"kernels/__init__.py",  # must not exist (README, "Reliability")
                       "kernels/geoalign_kernels/tuned_configs.json",  # written by the GPU proof's tune stage
                       ".ci/latest-freeze.txt",  # written by .ci/latest
                       "bench/results/h200"}  # an --out example
    pattern = re.compile(r"(?<![\w./-])((?:geoalign|kernels|tests|bench|csrc|docs|configs|\.ci)/[\w./*{},-]+)")
    missing = {path: where[:3] for path, where in named_in_sources(pattern).items()
               if not any(c in path for c in "*{") and path.rstrip(".,:;)") not in not_in_the_tree
               and not (ROOT / path.rstrip(".,:;)")).exists()}
    assert not missing, f"paths that do not exist: {missing}"
