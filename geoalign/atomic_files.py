"""Crash-safe writes: every file and directory the package writes goes through this module.

A reader of any path written here sees either the old content or the complete new content, never a prefix:
  write_bytes / write_text / write_json / save_safetensors
      a temporary file in the same directory is written, flushed and fsync'ed, then ``os.replace``d over the
      path, and the directory is fsync'ed;
  staged_directory(path, marker)
      a context that yields a staging directory beside ``path``; when the block succeeds every file in it is
      fsync'ed and it is renamed into place (an existing ``path`` must be one this package wrote, recognised by
      ``marker``, and is renamed aside first, then removed); when the block raises the stage is removed and
      ``path`` is untouched;
  append_jsonl / read_jsonl
      line-oriented logs (predictions, training log): each append is flushed and fsync'ed; a crash can leave at
      most a cut last line, which read_jsonl drops (and drop_cut_tail removes before the next append);
  write_jsonl
      a whole line-oriented file replaced at once (as write_bytes), in append_jsonl's line format.

The two low-level writers ``_write`` and ``_save_file`` are module attributes so tests can make a write fail
halfway (tests/test_atomic_files.py); nothing else in the package writes files directly. A write that fails because
the file system is full raises :class:`DiskFullError` naming the path and the bytes still free there (the old content,
if any, is intact).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

STAGING_PREFIX = ".staging-"
REPLACED_PREFIX = ".replaced-"


def _write(f, data: bytes) -> None:
    """Write all of ``data`` to the open binary file ``f`` (the single low-level byte writer)."""
    f.write(data)


def _save_file(tensors: dict, path: str, metadata: dict | None) -> None:
    """safetensors' own writer (the single low-level tensor-file writer)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def fsync_dir(path: str) -> None:
    """fsync a directory, so a rename inside it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path``, bottom-up."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the process umask (mkstemp makes 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class DiskFullError(OSError):
    """A write failed because its file system is full (or the user's quota is): the message names the path and the
    bytes still free there."""


def free_bytes(path: str) -> int:
    """Bytes free on the file system of ``path`` (or of its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException, path: str) -> bool:
    """Whether ``error`` (from writing under ``path``) is the file system running out of space: ENOSPC / EDQUOT, or
    any other error of a library's writer (torch.save says "basic_ios::clear: iostream error") while under 1 MiB
    is left there."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(error) or free_bytes(path) < 1 << 20


def disk_full(path: str, what: str) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"no space left to write {what} {path}: {free_bytes(path)} bytes free on its "
                                       "file system")


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


@contextlib.contextmanager
def _temporary_beside(path: str) -> Iterator[str]:
    """A fresh temporary path in ``path``'s directory; removed if the block fails, else renamed over ``path``."""
    parent = _parent(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())   # readable like any output file (mkstemp's is private to this user)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e, path):
            raise disk_full(path, "the file") from e
        raise
    fsync_dir(parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    with _temporary_beside(path) as tmp:
        with open(tmp, "wb") as f:
            _write(f, data)
            f.flush()


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """``tensors`` (name -> contiguous CPU tensor) as a safetensors file at ``path``, atomically."""
    path = os.fspath(path)
    with _temporary_beside(path) as tmp:
        _save_file(tensors, tmp, metadata)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, marker: str) -> Iterator[str]:
    """Yield a staging directory that replaces ``path`` when the block succeeds (see the module docstring).

    marker: a file name this package writes into every such directory; an existing non-empty ``path`` without it
    is refused (FileExistsError), so a user's unrelated directory is never replaced."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path!r} exists and is not a directory")
        if os.listdir(path) and not os.path.exists(os.path.join(path, marker)):
            raise FileExistsError(f"refusing to replace {path!r}: it is not empty and holds no {marker!r}, so it "
                                  "was not written by geoalign; choose a new or empty directory")
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}.", dir=parent)
    try:
        yield stage
        fsync_tree(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{name}.", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(stage, path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def drop_cut_tail(path: str | os.PathLike) -> None:
    """Cut a last line without its newline (a write interrupted by a crash) off a line-oriented file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def _jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_jsonl(path: str | os.PathLike, records: list) -> None:
    """Replace ``path`` with one JSON line per record, atomically (the lines append_jsonl writes)."""
    write_bytes(path, _jsonl_bytes(records))


def append_jsonl(path: str | os.PathLike, records: list) -> None:
    """Append one JSON line per record; flushed and fsync'ed before returning. A cut last line left by an earlier
    crash is removed first."""
    path = os.fspath(path)
    os.makedirs(_parent(path), exist_ok=True)
    drop_cut_tail(path)
    data = _jsonl_bytes(records)
    try:
        with open(path, "ab") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:                  # a cut last line may be left: read_jsonl and the next append drop it
        if is_disk_full(e, path):
            raise disk_full(path, "records to") from e
        raise


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON document at ``path``; FileNotFoundError ("{what} not found: path") or ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e


def read_jsonl(path: str | os.PathLike, line_numbers: bool = False) -> list:
    """The records of a JSONL file (with ``line_numbers``: (1-based line, record) pairs). A cut last line (an
    interrupted append) is dropped; a corrupt line before the end is a ValueError naming the file and line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: an interrupted append
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON (a corrupt line before the end; only a cut last "
                             "line is recovered)") from None
        out.append((i + 1, record) if line_numbers else record)
    return out
