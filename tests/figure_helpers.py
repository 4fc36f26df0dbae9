"""Checks on rendered matplotlib figures."""
from __future__ import annotations


def boxes_overlap(a, b) -> bool:
    """Whether two matplotlib bounding boxes (window extents) overlap."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
