"""GEOALIGN_GUARD=1: canary-padded output buffers, checked after every launch, and host checks of index values.

In guard mode every buffer a launch writes is replaced, for that launch, by a copy that sits inside a larger
allocation whose other bytes (both sides, and the gaps of a strided buffer) hold the canary byte 0xA5. After the
launch the canary bytes are compared on the host: a kernel that stored outside its buffer raises
:class:`GuardError` naming the launch, the buffer, how many bytes changed and where. The copy is then written back,
so results are the same as without the guard. The device data that decides addresses (token ids, slot ids, gather
rows) is also checked against its valid range before the launch (:func:`check_index_range`).

Each check synchronises with the device, so guard mode is for tests and debugging; off (the default) it costs
nothing. Under the Triton interpreter a stray store lands in process memory, so guard mode is what turns a
silent heap corruption into an error there; the test suite runs with it on (tests/conftest.py).

``ENABLED`` is read from the environment at import; tests may set it directly.
"""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import torch

ENABLED = os.environ.get("GEOALIGN_GUARD", "0") == "1"

CANARY = 0xA5
#: canary bytes on each side of a guarded buffer (a store that lands further away is not seen)
PAD_BYTES = 4096


class GuardError(RuntimeError):
    """A launch wrote outside a buffer it was given, or was given an out-of-range index (guard mode)."""


def _span(t: torch.Tensor) -> int:
    """Elements from t's first to its last element, inclusive (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


class _Padded:
    """A canary-padded stand-in for tensor ``t`` with t's shape, strides and current contents."""

    def __init__(self, t: torch.Tensor):
        if any(s < 0 for s in t.stride()):
            raise GuardError("guard mode does not support negative strides")
        self.orig = t
        item = t.element_size()
        self.pad = -(-PAD_BYTES // item)
        self.flat = torch.empty(self.pad + _span(t) + self.pad, dtype=t.dtype, device=t.device)
        self.flat.view(torch.uint8).fill_(CANARY)
        self.view = self.flat.as_strided(t.shape, t.stride(), self.pad)
        self.view.copy_(t)
        covered = torch.zeros(self.flat.numel(), dtype=torch.bool, device=t.device)
        covered.as_strided(t.shape, t.stride(), self.pad).fill_(True)
        self.free = ~covered  # element positions that must keep the canary

    def check(self, op: str, name: str) -> None:
        raw = self.flat.view(torch.uint8).reshape(self.flat.numel(), -1)
        changed = (raw != CANARY).any(dim=1) & self.free
        count = int(changed.sum())
        if count:
            first = int(changed.nonzero()[0, 0]) - self.pad
            where = "before its first element" if first < 0 else "inside its stride gaps or after its end"
            raise GuardError(
                f"GEOALIGN_GUARD: {op} wrote {count} element(s) outside {name} (shape {list(self.orig.shape)}, "
                f"strides {list(self.orig.stride())}, {str(self.orig.dtype).replace('torch.', '')}); first at "
                f"element offset {first} from its start, {where}")

    def copy_back(self) -> None:
        self.orig.copy_(self.view)


@contextlib.contextmanager
def guarded(op: str, **buffers):
    """Context for one launch of ``op`` that writes ``buffers`` (name=tensor, None allowed). Yields a namespace with
    the tensors to hand the kernel: the originals, or canary-padded copies in guard mode (checked and written back
    on exit)."""
    if not ENABLED:
        yield SimpleNamespace(**buffers)
        return
    padded = {name: _Padded(t) for name, t in buffers.items() if isinstance(t, torch.Tensor) and t.numel() > 0}
    yield SimpleNamespace(**{name: padded[name].view if name in padded else t for name, t in buffers.items()})
    for name, p in padded.items():
        p.check(op, name)
    for p in padded.values():
        p.copy_back()


def check_index_range(op: str, name: str, index: torch.Tensor, high: int, what: str) -> None:
    """In guard mode: every value of ``index`` must be in [0, high) (``what`` names the extent). One sync."""
    if not ENABLED or index.numel() == 0:
        return
    low_v, high_v = int(index.min()), int(index.max())
    if low_v < 0 or high_v >= high:
        raise GuardError(f"GEOALIGN_GUARD: {op}: {name} must lie in [0, {high}) ({what}), got values in "
                         f"[{low_v}, {high_v}]")
