"""Launch configurations (tile shapes, num_warps, num_stages) per device, dtype and shape class; the optional
autotune path; and :func:`launch_kwargs`.

A config is looked up by (device name, op, dtype, shape class); shape class is "small" when the GEMM's row count is
< 1024, else "large". In order:
  1. GEOALIGN_AUTOTUNE=1 (CUDA only): :func:`tune` times every candidate of CANDIDATES[op] on the first call of a
     key (triton.testing.do_bench, median; buffers the kernel updates in place are restored after each timing),
     keeps the fastest for the process, and :func:`write_tuned` merges the choices into tuned_configs.json;
  2. tuned_configs.json beside this file: {device name: {"op|dtype|shape class": config}}, committed from a GPU
     run. None exists yet: no GPU has run this repository's kernels (see the README, "Benchmark");
  3. the static defaults below: H100/H200 (device class by name) or "default". The Hopper entries are starting
     points from the usual Triton GEMM tutorial/Liger settings for bf16 on sm90, NOT tuned here.
Under the Triton interpreter (TRITON_INTERPRET=1) every op uses small fixed blocks and no autotune, so CPU tests
stay fast and deterministic.

ops: "gemm" (the shared GEMM: output stage, router and weight gradients), "bank_gemm1" (GEMM1 over the normalised
rows), "bank_weight_grad" (the weight-gradient GEMM dz^T x_hat and its epilogue), "rows" (row-wise kernels: gather +
normalise, dz / d alpha, routing; BLOCK_SIZE_M rows per program, BLOCK_SIZE_N the column chunk; not tuned).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .runtime import INTERPRET

#: GEOALIGN_AUTOTUNE=1: time the candidates on the first call of each key (CUDA only)
AUTOTUNE = os.environ.get("GEOALIGN_AUTOTUNE", "0") == "1"
TUNED_PATH = Path(__file__).with_name("tuned_configs.json")

#: row blocks per group in the grouped launch order of the shared GEMM (Triton tutorial 03)
GROUP_SIZE_M = 8


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> dict:
    return {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "num_warps": warps, "num_stages": stages}


_INTERPRETER = _cfg(32, 32, 32, 1, 1)

_HOPPER = {
    ("gemm", "small"): _cfg(64, 128, 64, 4, 4),
    ("gemm", "large"): _cfg(128, 128, 64, 8, 3),
    ("bank_gemm1", "small"): _cfg(64, 128, 64, 4, 3),
    ("bank_gemm1", "large"): _cfg(128, 128, 64, 8, 3),
    ("bank_weight_grad", "small"): _cfg(128, 128, 32, 8, 3),
    ("bank_weight_grad", "large"): _cfg(128, 128, 64, 8, 3),
    ("rows", "small"): _cfg(16, 256, 64, 4, 1),
    ("rows", "large"): _cfg(32, 256, 64, 8, 1),  # 8 warps: 4 spill in dz / combine (aot_check, sm_90, triton 3.6)
}
_DEFAULT = {
    ("gemm", "small"): _cfg(64, 64, 32, 4, 3),
    ("gemm", "large"): _cfg(128, 64, 32, 4, 3),
    ("bank_gemm1", "small"): _cfg(64, 64, 32, 4, 3),
    ("bank_gemm1", "large"): _cfg(128, 64, 32, 4, 3),
    ("bank_weight_grad", "small"): _cfg(64, 64, 32, 4, 3),
    ("bank_weight_grad", "large"): _cfg(128, 64, 32, 4, 3),
    ("rows", "small"): _cfg(16, 128, 32, 4, 1),
    ("rows", "large"): _cfg(16, 128, 32, 4, 1),
}
CONFIGS = {"H100": _HOPPER, "H200": _HOPPER, "default": _DEFAULT}

#: test hook: force these values (e.g. {"BLOCK_SIZE_M": 16}) on every config, interpreter included
OVERRIDE: dict = {}


#: the autotune search space per op (the static defaults are always among them)
CANDIDATES = {
    "gemm": [_cfg(m, n, k, w, st) for (m, n, k, w, st) in
             ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
              (128, 64, 64, 4, 4), (64, 64, 32, 4, 3), (128, 128, 32, 4, 4))],
    "bank_gemm1": [_cfg(m, n, k, w, st) for (m, n, k, w, st) in
                 ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                  (128, 64, 64, 4, 4), (64, 64, 32, 4, 3))],
    "bank_weight_grad": [_cfg(m, n, k, w, st) for (m, n, k, w, st) in
                 ((128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 32, 8, 3),
                  (64, 64, 32, 4, 3), (128, 64, 64, 4, 3))],
}
#: this process's autotune choices: {device name: {key: config with its median "ms"}}
_SESSION: dict = {}


@functools.lru_cache(maxsize=None)
def device_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index)


def device_class(name: str) -> str:
    for key in ("H200", "H100"):
        if key in name:
            return key
    return "default"


def shape_class(rows: int) -> str:
    return "small" if rows < 1024 else "large"


def table_key(op: str, dtype: torch.dtype | None, rows: int) -> str:
    """"op|dtype|shape class", the key of tuned_configs.json and of the autotune cache."""
    return f"{op}|{str(dtype).replace('torch.', '') if dtype is not None else 'any'}|{shape_class(rows)}"


_TABLE_CACHE: dict = {}


def tuned_table() -> dict:
    """The committed tuned configs {device name: {key: config}} at TUNED_PATH ({} when there is no such file);
    re-read when the file changes."""
    path = Path(TUNED_PATH)
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    key = (str(path), stamp)
    if key not in _TABLE_CACHE:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"geoalign_kernels: cannot read the tuned configs {path}: {exc}") from exc
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise RuntimeError(f"geoalign_kernels: {path} must map device names to {{key: config}} objects")
        table = {name: {_renamed_key(k): v for k, v in entries.items()} for name, entries in table.items()}
        _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = table
    return _TABLE_CACHE[key]


#: op names of earlier releases -> today's (kept for one release: a tuned_configs.json written before the rename)
RENAMED_OPS = {"bank_fwd": "bank_gemm1", "bank_dw1": "bank_weight_grad"}


def current_op_name(op: str) -> str:
    """Today's name of op ``op``; an earlier release's name warns (DeprecationWarning) and is mapped."""
    if op in RENAMED_OPS:
        import warnings

        warnings.warn(f"kernel op {op!r} is now {RENAMED_OPS[op]!r}", DeprecationWarning, stacklevel=3)
        return RENAMED_OPS[op]
    return op


def _renamed_key(key: str) -> str:
    op, sep, rest = key.partition("|")
    if op in RENAMED_OPS:
        import warnings

        warnings.warn(f"tuned config key {key!r}: op {op!r} is now {RENAMED_OPS[op]!r}", DeprecationWarning,
                      stacklevel=3)
        return RENAMED_OPS[op] + sep + rest
    return key


def config_for(op: str, rows: int, name: str, dtype: torch.dtype | None = None) -> dict:
    """The config of ``op`` on the CUDA device called ``name``: this process's autotune choice, else the tuned
    table's entry, else the static default of the device class."""
    op = current_op_name(op)
    key = table_key(op, dtype, rows)
    found = _SESSION.get(name, {}).get(key) or tuned_table().get(name, {}).get(key)
    if found is not None:
        cfg = {k: int(found[k]) for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")}
    else:
        cfg = dict(CONFIGS[device_class(name)][(op, shape_class(rows))])
    if dtype == torch.float64:
        cfg["BLOCK_SIZE_K"] = min(cfg["BLOCK_SIZE_K"], 32)
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    return cfg


def get_config(op: str, rows: int, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """{BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps, num_stages} for ``op`` with ``rows`` GEMM rows on
    ``device``; ``dtype`` is the operand dtype (fp64 tiles are halved in K and get 2 stages to fit shared memory)."""
    if INTERPRET or device.type != "cuda":
        cfg = dict(_INTERPRETER)
    else:
        cfg = config_for(op, rows, device_name(device.index or 0), dtype)
    cfg.update(OVERRIDE)
    return cfg


def choose(candidates: list, launch, restore=(), bench=None) -> tuple[dict, list]:
    """The fastest of ``candidates`` by ``bench(fn) -> ms`` (default triton.testing.do_bench, median), running
    ``launch(cfg)``. Tensors in ``restore`` are put back after each timing (kernels that update them in place). A
    candidate that fails to compile or launch (e.g. too much shared memory) is skipped. Returns (best config,
    [(config, ms or the error)])."""
    if bench is None:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    saved = [t.clone() for t in restore]
    timings = []
    for cfg in candidates:
        try:
            timings.append((cfg, float(bench(lambda: launch(cfg)))))
        except Exception as exc:  # out of resources, compile errors: not a candidate here
            timings.append((cfg, f"{type(exc).__name__}: {exc}"[:200]))
        finally:
            for t, s in zip(restore, saved):
                t.copy_(s)
    measured = [(cfg, ms) for cfg, ms in timings if isinstance(ms, float)]
    if not measured:
        raise RuntimeError(f"geoalign_kernels autotune: every candidate failed: {timings}")
    return min(measured, key=lambda c: c[1])[0], timings


def tune(op: str, rows: int, device: torch.device, dtype: torch.dtype | None, launch, restore=()) -> dict:
    """The config to launch ``op`` with: with GEOALIGN_AUTOTUNE=1 on a CUDA device, the fastest candidate for this
    (device, op, dtype, shape class), timed on the first call (``launch(cfg)`` runs the kernel; ``restore`` as in
    :func:`choose`) and kept for the process; otherwise :func:`get_config`."""
    op = current_op_name(op)
    if not AUTOTUNE or INTERPRET or device.type != "cuda" or op not in CANDIDATES:
        return get_config(op, rows, device, dtype)
    name, key = device_name(device.index or 0), table_key(op, dtype, rows)
    if key not in _SESSION.get(name, {}):
        base = config_for(op, rows, name, dtype)
        candidates = [base] + [c for c in CANDIDATES[op] if c != base]
        if dtype == torch.float64:
            candidates = [c for c in candidates if c["BLOCK_SIZE_K"] <= 32 and c["num_stages"] <= 2] or [base]
        best, timings = choose(candidates, launch, restore)
        ms = min(t for _, t in timings if isinstance(t, float))
        _SESSION.setdefault(name, {})[key] = {**best, "ms": ms, "default_ms": timings[0][1]}
    return get_config(op, rows, device, dtype)


def tuned_configs() -> dict:
    """This process's autotune choices {device name: {key: config, ms, default_ms}}."""
    return json.loads(json.dumps(_SESSION))


def write_tuned(path: str | os.PathLike | None = None) -> dict:
    """Merge this process's autotune choices into the table at ``path`` (default TUNED_PATH), atomically; returns
    the merged table."""
    path = Path(path if path is not None else TUNED_PATH)
    table = {}
    if path.exists():
        table = json.loads(path.read_text())
    for name, entries in _SESSION.items():
        table.setdefault(name, {}).update(entries)
    # the kernel package does not import geoalign (geoalign.atomic_files): the same temp + fsync + rename here
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (json.dumps(table, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _TABLE_CACHE.clear()
    return table


def launch_kwargs(cfg: dict, *, group: bool = False) -> dict:
    """The keyword arguments of a tiled kernel launch: the three block sizes, num_warps, num_stages (and
    GROUP_SIZE_M for kernels launched in grouped order)."""
    kw = {key: cfg[key] for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")}
    if group:
        kw["GROUP_SIZE_M"] = GROUP_SIZE_M
    return kw
