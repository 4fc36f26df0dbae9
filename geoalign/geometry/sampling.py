"""Which frames of a video are read: uniform sampling rules (numpy only, so the command line can name them without
importing torch)."""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("geoalign.geometry")
_WARNED: set[tuple[int, int]] = set()

#: how ``num_frames`` indices are picked from ``linspace(0, total - 1, num_frames)``: rounded to the nearest index
#: (numpy's round-half-to-even; the default) or truncated, as VG-LLM's ``np.linspace(...).astype(int)``
FRAME_SAMPLING = ("linspace-round", "linspace-floor")


def sample_frame_indices(total: int, num_frames: int | None, sampling: str = "linspace-round") -> list[int]:
    """Uniform sampling: ``round(linspace(0, total-1, N))`` (``sampling="linspace-floor"``: truncated instead); all
    frames when N is None or N >= total."""
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"unknown frame sampling {sampling!r}; expected one of {FRAME_SAMPLING}")
    if total <= 0:
        raise ValueError("cannot sample frames from an empty sequence (0 frames)")
    if num_frames is None or num_frames >= total:
        if num_frames is not None and num_frames > total and (num_frames, total) not in _WARNED:
            _WARNED.add((num_frames, total))       # once per (asked, present): an eval would repeat it per question
            logger.warning("asked for %d frames but only %d exist; using all %d (said once per such pair)",
                           num_frames, total, total)
        return list(range(total))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    points = np.linspace(0, total - 1, num_frames)
    return (np.round(points) if sampling == "linspace-round" else points).astype(np.int64).tolist()
