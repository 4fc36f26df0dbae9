"""Timers: CUDA events around each repetition on GPU, a repeated perf_counter timer on CPU; the device name."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_fn(fn: Callable, device: torch.device, setup: Callable | None = None, min_reps: int = 3,
            max_reps: int = 50, budget_s: float = 2.0, warmup: int = 1) -> dict[str, float]:
    """Median, 20th and 80th percentile of fn's run time in ms, and the number of repetitions.

    ``setup()`` (untimed) runs before every call and its result is passed to ``fn`` (e.g. the forward whose
    backward is timed). On CUDA each repetition is bracketed by CUDA events (after a synchronize); on CPU by
    perf_counter. Repeats until `budget_s` is spent (at least `min_reps`, at most `max_reps`) after `warmup`
    untimed calls.
    """
    for _ in range(warmup):
        if setup is not None:
            fn(setup())
        else:
            fn()
    cuda = device.type == "cuda"
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
        arg = setup() if setup is not None else None
        run = (lambda: fn(arg)) if setup is not None else fn  # noqa: E731
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        del arg, run
        times.append(ms)
        spent += ms / 1e3
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
            "reps": len(times)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
