"""Terminal table, JSON and PNG output of benchmark rows."""
from __future__ import annotations

import io
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


def write_plots(path: str, rows: list[dict], title: str) -> bool:
    """time and memory vs frames, one line per backend and mode. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple, list] = {}
    for r in rows:
        if "median_ms" in r:
            series.setdefault((r["case"], r["backend"], r["mode"]), []).append(r)
    backends = sorted({k[1] for k in series})
    colour = {b: f"C{i}" for i, b in enumerate(backends)}  # one colour per backend, one line style per mode
    style = {"fwdbwd": "-", "fwd": "--", "bwd": ":", "infer": "-."}
    for (case, backend, mode), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["frames"])
        kw = dict(color=colour[backend], linestyle=style.get(mode, "-"), marker="o", label=f"{backend} {mode}")
        ax_t.plot([r["frames"] for r in rs], [r["median_ms"] for r in rs], **kw)
        mem = [(r["frames"], r.get("peak_bytes")) for r in rs if r.get("peak_bytes")]
        if mem:
            ax_m.plot([f for f, _ in mem], [b / 2**20 for _, b in mem], **kw)
    for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xlabel("frames")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_files.write_bytes(path, buf.getvalue())
    return True
