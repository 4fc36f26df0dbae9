"""transformers' own model tests (``ModelTesterMixin``, ``GenerationTesterMixin``, ``ConfigTester``) for the
installed transformers version, fetched at test time; nothing of them is stored in this repository.

Where they come from, first found wins:
1. ``GEOALIGN_TRANSFORMERS_TESTS``: the ``tests/`` folder of a transformers source checkout at the installed version
   (complete: every mixin runs);
2. the source distribution of the installed version, fetched once into the cache
   (``pip download --no-binary :all: --no-deps transformers==<version>``; ``$GEOALIGN_CACHE`` or
   ``~/.cache/geoalign``). transformers' sdist ships ``transformers/tests/test_modeling_common.py`` and
   ``transformers/tests/test_configuration_common.py`` but not the modules they import (``generation/test_utils.py``,
   ``exporters/test_export.py``, ``utils/test_configuration_utils.py``; checked for 5.17 and 5.25): those are
   replaced in the cached copy by empty stand-ins (``STAND_INS``), so ModelTesterMixin runs and the generation,
   export and config-argument mixins do not (``missing`` says which).
Neither available (offline, no checkout): the tests are skipped with the reason.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: support modules transformers' common test files import, and the empty stand-in used when the sdist lacks them
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
NEEDED = ("test_modeling_common.py", "test_configuration_common.py")


@dataclass
class TransformersTests:
    """The importable package holding transformers' test modules, and which support modules are stand-ins."""

    package: str
    source: str
    missing: list[str] = field(default_factory=list)

    def module(self, name: str):
        return importlib.import_module(f"{self.package}.{name}")


def cache_dir() -> Path:
    return Path(os.environ.get("GEOALIGN_CACHE", Path.home() / ".cache" / "geoalign"))


def _fetch_sdist_tests(version: str, into: Path) -> str | None:
    """transformers' sdist tests/ folder into ``into`` (once; extracted beside it and renamed into place, so a
    concurrent or interrupted run never sees a half-written folder); None on success, else why not."""
    if (into / "test_modeling_common.py").is_file():
        return None
    into.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download, tempfile.TemporaryDirectory(dir=into.parent) as tmp:
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        try:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                                  "--retries", "1", "--timeout", "15", *isolation, f"transformers=={version}",
                                  "-d", download], capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"pip download of transformers=={version}'s sdist failed: {e}"
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if run.returncode != 0 or not archives:
            return (f"pip download of transformers=={version}'s sdist failed (offline?): "
                    f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        staged = Path(tmp) / "tests"
        with tarfile.open(archives[0]) as tar:
            prefix = f"{archives[0].name[:-len('.tar.gz')]}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and m.name.endswith(".py")]
            for m in members:
                target = staged / m.name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not all((staged / n).is_file() for n in NEEDED):
            return f"transformers=={version}'s sdist has no tests/{NEEDED[0]}"
        try:
            os.rename(staged, into)
        except OSError:  # another run put it there first: keep that one
            if not (into / "test_modeling_common.py").is_file():
                raise
    return None


def _assemble(tests_dir: Path, package: str) -> tuple[Path, list[str]]:
    """A private copy of ``tests_dir`` as the importable package ``package`` (in a temporary folder of this process,
    removed at exit: no run shares it), with __init__ files and the stand-ins for missing support modules; returns
    (the folder to put on sys.path, the stood-in module paths)."""
    root = Path(tempfile.mkdtemp(prefix="geoalign-hf-tests-"))
    atexit.register(shutil.rmtree, root, True)
    target = root / package
    shutil.copytree(tests_dir, target, ignore=shutil.ignore_patterns("__pycache__", "models", "fixtures"))
    missing = []
    for rel, text in STAND_INS.items():
        path = target / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# stand-in written by geoalign: transformers' tests/{rel} was not available\n{text}")
            missing.append(rel)
    for folder in [target, *[p for p in target.rglob("*") if p.is_dir()]]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    return root, missing


def load() -> TransformersTests | str:
    """The transformers tests for the installed version, or a string saying why they are unavailable."""
    import transformers

    version = transformers.__version__
    package = "hf_tests_" + "".join(c if c.isalnum() else "_" for c in version)
    checkout = os.environ.get("GEOALIGN_TRANSFORMERS_TESTS")
    if checkout:
        tests_dir, source = Path(checkout), f"GEOALIGN_TRANSFORMERS_TESTS={checkout}"
        if not (tests_dir / NEEDED[0]).is_file():
            return f"GEOALIGN_TRANSFORMERS_TESTS={checkout} has no {NEEDED[0]}"
    else:
        tests_dir, source = cache_dir() / f"transformers-{version}-sdist-tests", f"transformers=={version} sdist"
        why = _fetch_sdist_tests(version, tests_dir)
        if why is not None:
            return why
    package_root, missing = _assemble(tests_dir, package)
    sys.path.insert(0, str(package_root))
    return TransformersTests(package, source, missing)
