"""Relative paths taken from data files (a dataset record's media, a benchmark annotation's scene) stay inside the
folder they are relative to: a record from someone else cannot climb out of it with ``../../``. An absolute path is a
file named on purpose and is used as written."""
from __future__ import annotations

import os


def resolve_inside(root: str, path: str, what: str) -> str:
    """``root/path`` normalised, which must lie inside ``root`` when ``path`` is relative (an absolute ``path`` is
    returned as written); ValueError naming ``what`` otherwise. Symbolic links inside ``root`` are followed as usual:
    only the path's own ``..`` segments are judged."""
    if os.path.isabs(path):
        return path
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, path))
    if os.path.commonpath([base, full]) != base:
        raise ValueError(f"{what} {path!r} lies outside {root!r} (paths in data files must stay inside the folder "
                         "they are relative to)")
    return full
