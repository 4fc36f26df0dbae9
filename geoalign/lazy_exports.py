"""PEP 562 lazy exports for the package ``__init__`` files: a name is imported from its submodule on first use, so
importing a package (and the command line's argument parsing) costs nothing until a name is touched."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package`` whose public names live in submodules: ``exports`` maps a name
    to the submodule (relative to ``package``) that defines it. A loaded name is cached in the package's globals."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__


def deprecated_aliases(module: str, aliases: dict[str, str]) -> Callable[[str], object]:
    """``__getattr__`` for ``module`` whose old public names moved: ``aliases`` maps an old name to its new home,
    ``"package.module:name"``. Reading an old name warns (DeprecationWarning, naming the new home) and returns the
    object there. Kept for one release after a rename."""

    def __getattr__(name: str):
        home = aliases.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        import warnings

        target, _, attr = home.partition(":")
        warnings.warn(f"{module}.{name} is deprecated; use {target}.{attr}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), attr)

    return __getattr__
