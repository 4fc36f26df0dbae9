"""Idempotent ``torch.library.custom_op`` registration for every geoalign op (Triton and CUDA).

Why: ``torch.library.custom_op`` run a second time for the same qualified name destroys the first registration
(``torch._library.custom_ops.get_library_allowing_overwrite``). The op objects that the first import still holds
then point at freed dispatcher entries, and the next call through them reads freed memory: a segfault, or a garbage
length that makes ``std::vector::reserve`` throw (pybind11: ``ValueError: vector::reserve``). That is how the test
suite crashed, about one run in six: transformers' probe for Hugging Face's ``kernels`` package imported this
repository's old top-level ``kernels/`` folder a second time, under the name ``kernels`` (see the README's
"Reliability" section for the whole chain).

The folder layout now prevents that import, and this module makes a second import harmless anyway: an op that is
already registered under the same name is reused, never re-registered. Re-running ``register_fake`` /
``register_autograd`` on the reused op only rebinds the Python functions, which come from the same source.
This module imports torch only (the CUDA backend uses it without Triton).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

#: the ops this package registered, by qualified name (strong references: torch keeps only weak ones)
REGISTERED: dict = {}


def custom_op(qualname: str, *, mutates_args: Iterable[str] | str = ()) -> Callable:
    """Decorator like ``torch.library.custom_op(qualname, mutates_args=...)``, but idempotent per ``qualname``."""

    def register(fn: Callable):
        existing = REGISTERED.get(qualname)
        if existing is None:
            existing = _registered_by_torch(qualname)
        if existing is not None:
            REGISTERED[qualname] = existing
            return existing
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
        REGISTERED[qualname] = op
        return op

    return register


def _registered_by_torch(qualname: str):
    """The live CustomOpDef torch holds for ``qualname`` (registered by another copy of a geoalign module), or None."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - a torch without the registry: fall back to plain registration
        return None
    return OPDEFS.get(qualname)
