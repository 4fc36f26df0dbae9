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


def reset_peak_rss() -> bool:
    """Return freed heap memory to the OS (glibc malloc_trim) and reset the process's peak RSS (VmHWM) on Linux,
    so the next peak measures only what follows; False where that is not possible."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size (since the last reset_peak_rss()), from /proc/self/status (Linux);
    None where that file does not exist."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory so far: CUDA max_memory_allocated on a GPU, else the process's peak RSS (VmHWM, or ru_maxrss)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = peak_rss_bytes()
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
