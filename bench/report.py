"""Terminal table, JSON and PNG output of benchmark rows."""
from __future__ import annotations

import io
import math
import os
import platform
import sys
from datetime import datetime, timezone

import torch

from geoalign import atomic_files


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    head = ("case", "mode", "frames", "L", "backend", "median ms", "p20-p80 ms", "TFLOP/s", "% peak", "x vs ref",
            "saved MiB", "peak MiB", "mem vs ref")
    lines = [head]
    for r in rows:
        if "median_ms" not in r:
            lines.append((r["case"], r["mode"], str(r["frames"]), str(r["L"]), r["backend"], r.get("status", "-"),
                          "", "", "", "", "", "", ""))
            continue
        mem_ratio = r.get("peak_bytes_ratio_vs_reference") or r.get("saved_bytes_ratio_vs_reference")
        lines.append((
            r["case"], r["mode"], str(r["frames"]), str(r["L"]), r["backend"], f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}", f"{r['tflops']:.3f}" if "tflops" in r else "-",
            f"{r['pct_of_matmul_peak']:.1f}" if "pct_of_matmul_peak" in r else "-",
            f"{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "-",
            _mib(r.get("saved_bytes")), _mib(r.get("peak_bytes")), f"{mem_ratio:.3f}" if mem_ratio else "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def environment(device: torch.device) -> dict:
    from .timing import device_name

    env = {
        "device": device_name(device),
        "device_type": device.type,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
            env["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
            env["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
        except Exception as e:  # NVML is optional
            env["nvml"] = f"unavailable: {type(e).__name__}"
    return env


def write_json(path: str, payload: dict) -> None:
    atomic_files.write_json(path, payload, indent=1)


# one colour per backend (the default cycle), one line style and marker per mode: a mode keeps its look in every plot
MODE_STYLES = {"fwdbwd": ("-", "o"), "fwd": ("--", "s"), "bwd": (":", "^"), "infer": ("-.", "D"),
               "infer-fold": ((0, (3, 1, 1, 1, 1, 1)), "v"), "step": ("-", "o")}
_SPARE_STYLES = [((0, (8, 3)), "P"), ((0, (1, 1)), "X"), ((0, (4, 1, 4, 4)), "*"), ((0, (3, 3, 1, 3)), "h")]


def mode_styles(modes) -> dict[str, tuple]:
    """(linestyle, marker) per mode: the fixed ones above, then distinct spare ones for modes not listed."""
    out, used = {}, set()
    for m in modes:
        if m in MODE_STYLES:
            out[m] = MODE_STYLES[m]
            used.add(MODE_STYLES[m][1])
    spare = [s for s in _SPARE_STYLES + list(MODE_STYLES.values()) if s[1] not in used]
    for m in modes:
        if m not in out:
            out[m] = spare.pop(0) if spare else ("-", "o")
    return out


def backend_colours(backends) -> dict[str, str]:
    """A distinct colour per backend: tab10 (the default cycle), then tab20's other shades, then a colour wheel."""
    import matplotlib

    names = list(backends)
    if len(names) <= 10:
        return {b: f"C{i}" for i, b in enumerate(names)}
    tab20 = matplotlib.colormaps["tab20"]
    wheel = matplotlib.colormaps["hsv"]
    colours = [tab20(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
    colours += [wheel(i / max(1, len(names) - 20)) for i in range(max(0, len(names) - 20))]
    return {b: colours[i] for i, b in enumerate(names)}


def plain_number(value: float, _pos=None) -> str:
    """Tick label without exponents: 600, 1500, 1.5, 0.25 (3 significant digits, trailing zeros dropped)."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


LOG_TICK_SUBS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9),
                 (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))


def log_ticks(lo: float, hi: float, max_ticks: int = 9, min_ticks: int = 4) -> list[float]:
    """Round tick values inside [lo, hi] (lo > 0) for a log axis: the coarsest of 10^k, 1-2-5, 1-2-3-5-7, ... per
    decade that gives at least ``min_ticks`` (else the one giving most, up to ``max_ticks``); powers of ten, thinned,
    where even those are more than ``max_ticks``. May return fewer than two where [lo, hi] is narrow (the caller
    widens it)."""
    if not (lo > 0 and hi >= lo):
        return []
    first, last = int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi)))

    def within(subs):
        vals = sorted({round(s * 10.0 ** e, 12 - e) for e in range(first, last + 1) for s in subs})
        return [v for v in vals if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

    options = [within(subs) for subs in LOG_TICK_SUBS]
    if len(options[0]) > max_ticks:
        return options[0][::-(-len(options[0]) // max_ticks)]
    fitting = [t for t in options if len(t) <= max_ticks]
    return next((t for t in fitting if len(t) >= min_ticks), max(fitting, key=len))


def _plain_log_yaxis(ax, lo: float, hi: float) -> None:
    """y limits [lo, hi], major ticks at round values inside (:func:`log_ticks`) labelled as plain numbers, minor
    ticks unlabelled; the limits widen to the neighbouring round values where fewer than two ticks would show."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ticks = log_ticks(lo, hi)
    if len(ticks) < 2:
        e0, e1 = int(math.floor(math.log10(lo))) - 1, int(math.ceil(math.log10(hi))) + 1
        nice = sorted(s * 10.0 ** e for e in range(e0, e1 + 1) for s in range(1, 10))
        below = max(v for v in nice if v <= lo * (1 + 1e-9))
        above = min(v for v in nice if v >= hi * (1 - 1e-9) and v > below * (1 + 1e-9))
        lo, hi = below / 1.08, above * 1.08
        ticks = log_ticks(below, above)
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _frame_axis(ax, frames: list[int]) -> None:
    """Log-2 x axis with a tick at each measured frame count, labelled plainly (labels thinned only where they would
    collide), and no minor ticks."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    frames = sorted(set(frames))
    ax.set_xscale("log", base=2)
    lo, hi = frames[0], frames[-1]
    pad = 2 ** (max(math.log2(hi / lo), 1.0) * 0.08)
    ax.set_xlim(lo / pad, hi * pad)
    min_gap = max(math.log2(hi / lo), 1.0) / 12          # labels at least 1/12 of the span apart
    labels, last = [], None
    for i, f in enumerate(frames):
        keep = last is None or math.log2(f / last) >= min_gap
        if i == len(frames) - 1 and not keep and last != frames[0]:   # label the largest count, not its neighbour
            labels[labels.index(str(last))] = ""
            keep = True
        labels.append(str(f) if keep else "")
        last = f if keep else last
    ax.xaxis.set_major_locator(FixedLocator(frames))
    ax.xaxis.set_major_formatter(FixedFormatter(labels))
    ax.xaxis.set_minor_locator(NullLocator())


def write_plots(path: str, rows: list[dict], title: str) -> bool:
    """time and memory vs frames, one line per backend and mode (colour = backend, line style and marker = mode),
    legend beside the panels. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = plot_rows(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_files.write_bytes(path, buf.getvalue())
    return True


def plot_rows(rows: list[dict], title: str):
    """The figure write_plots saves (matplotlib imported by the caller): time and peak memory against frames."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    series: dict[tuple, list] = {}
    for r in rows:
        if "median_ms" in r:
            series.setdefault((r["case"], r["backend"], r["mode"]), []).append(r)
    backends = sorted({k[1] for k in series})
    modes = sorted({k[2] for k in series}, key=lambda m: (list(MODE_STYLES).index(m) if m in MODE_STYLES else 99, m))
    colour, style = backend_colours(backends), mode_styles(modes)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12.5, 4.4), layout="constrained")
    frames: set[int] = set()
    ys: dict = {ax_t: [], ax_m: []}
    for (case, backend, mode), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["frames"])
        ls, marker = style[mode]
        kw = dict(color=colour[backend], linestyle=ls, marker=marker, markersize=6, linewidth=1.6,
                  label=f"{backend} {mode}")
        x, y = [r["frames"] for r in rs], [r["median_ms"] for r in rs]
        ax_t.plot(x, y, **kw)
        frames.update(x)
        ys[ax_t] += [v for v in y if v > 0]
        mem = [(r["frames"], r["peak_bytes"] / 2**20) for r in rs if (r.get("peak_bytes") or 0) > 0]
        if mem:
            ax_m.plot([f for f, _ in mem], [b for _, b in mem], **kw)
            ys[ax_m] += [b for _, b in mem]
    for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        if frames:
            _frame_axis(ax, sorted(frames))
        if ys[ax]:
            ax.set_yscale("log")
            lo, hi = min(ys[ax]), max(ys[ax])
            margin = (hi / lo) ** 0.06 if hi > lo else 1.15
            _plain_log_yaxis(ax, lo / margin, hi * margin)
            ax.grid(True, which="major", alpha=0.45)
            ax.grid(True, which="minor", alpha=0.15)
        else:
            ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_yticks([])
    handles = [Line2D([], [], linestyle="none", label="backend (colour)")]
    handles += [Line2D([], [], color=colour[b], linewidth=3, label=b) for b in backends]
    if len(modes) > 1 or not backends:
        handles += [Line2D([], [], linestyle="none", label=" "), Line2D([], [], linestyle="none", label="mode (line)")]
        handles += [Line2D([], [], color="0.25", linestyle=style[m][0], marker=style[m][1], linewidth=1.6, label=m)
                    for m in modes]
    elif modes:
        handles[0].set_label(f"backend (colour), mode {modes[0]}")
    legend = fig.legend(handles=handles, loc="outside right upper", fontsize=8, handlelength=4, frameon=False)
    for text, h in zip(legend.get_texts(), handles):
        if h.get_linestyle() in ("none", "None") and h.get_marker() in ("None", None, "none", ""):
            text.set_fontweight("bold")
    fig.suptitle(title, fontsize=9)
    return fig
