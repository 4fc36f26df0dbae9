"""Memory accounting shared by the tests and the benchmarks."""
from __future__ import annotations

import torch


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside the ``with`` block.

    Each distinct storage is counted once (a tensor saved by several nodes, or a view of a saved tensor, costs its
    storage once), which is what the saved activations really occupy. Tensors whose storage belongs to
    ``exclude`` (e.g. ``module.parameters()``: weights saved by reference cost nothing extra) are not counted.
    """

    def __init__(self, exclude=()):
        self._storages: dict[int, int] = {}
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
