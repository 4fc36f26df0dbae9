"""The README's layout table matches the tree, and docs/architecture.md exists and is what the code cites."""
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
