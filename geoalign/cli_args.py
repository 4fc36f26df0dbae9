"""Argument checks shared by every ``geoalign`` sub-command, run before any work starts.

Everything here imports only the standard library at module level (``geoalign --help`` must not import torch);
:func:`resolve_device` and :func:`check_backend` import torch when called, after argument parsing.

Parse-time types (``type=`` of ``add_argument``; argparse turns their error into ``PROG: error: argument --x: MSG``):
  positive_int, non_negative_int, positive_float, local_path, output_dir, output_file
Run-time checks (raise :class:`UsageError`; :func:`fail` prints it as one line and returns exit code 2):
  resolve_device, check_backend, require_module
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable

LOCAL_ONLY = "geoalign reads local files only and downloads nothing"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with an argument error printed as one line (no usage block) and exit status 2. Its
    sub-command parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """A command-line input that cannot work here (a device, a backend, a missing optional package)."""


def fail(command: str, error: BaseException | str) -> int:
    """Print ``geoalign COMMAND: error: MESSAGE`` on stderr (one line) and return the usage exit code 2."""
    print(f"geoalign {command}: error: {error}", file=sys.stderr)
    return 2


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def json_object(text: str) -> dict:
    """A JSON object given on the command line (e.g. --vllm-kwargs)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {type(value).__name__} {text!r}")
    return value


def not_found(text: str) -> str:
    """The message for a model / data path that does not exist here."""
    return f"not found: {text!r} ({LOCAL_ONLY}; give the path of a local copy)"


def local_path(text: str) -> str:
    """An existing local file or directory (a model, checkpoint or data path); never a hub name."""
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(not_found(text))
    return path


def _check_parents(text: str, path: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory (``notes.txt/out`` can never be created)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent!r} is a file, not a directory")


def output_dir(text: str) -> str:
    """A directory to write into: it may exist (as a directory) or not; an existing file is refused."""
    path = os.path.expanduser(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a directory")
    _check_parents(text, path)
    return path


def output_file(text: str) -> str:
    """A file to write: it may exist (as a file) or not; an existing directory is refused."""
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is an existing directory, not a file")
    _check_parents(text, path)
    return path


def resolve_device(name: str | None):
    """The torch device for ``--device`` (None: cuda when available, else cpu), checked to exist here.
    Raises UsageError naming the device asked for and what this machine has."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = (f"this torch {torch.__version__} is a CPU build" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(f"--device {name} is not available: {why}; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name} is not available: {count} CUDA device(s) present "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise UsageError(f"--device {name} is not available here (this torch: {torch.__version__})")
    return device


def check_backend(name: str | None, device) -> None:
    """A fusion backend named on the command line must run on ``device`` here (None: the model's own choice). Only
    the named backend is probed (the cuda backend's probe may build its extension)."""
    if name is None:
        return
    from .backends import REGISTRY, backend_runs_on

    if not backend_runs_on(name, device):
        raise UsageError(f"fusion backend {name!r} cannot run on {device} here; {REGISTRY[name].needs}")


def use_device(device) -> None:
    """Make a CUDA ``device`` with an index (cuda:1) the current one: Triton launches on the current device."""
    import torch

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def check_attn(name: str | None) -> None:
    """--attn flash_attention_2 needs the flash-attn package (the [gpu] extra)."""
    if name == "flash_attention_2":
        require_module("flash_attn", "gpu", "--attn flash_attention_2")


def require_module(module: str, extra: str, what: str) -> None:
    """UsageError unless ``module`` is importable: ``WHAT needs MODULE: pip install "geoalign[EXTRA]"``."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}, which is not installed: pip install \"geoalign[{extra}]\"")


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
