"""Launch configurations (tile shapes, num_warps, num_stages) per device, GEMM call site, dtype and shape; the
optional autotune path; and :func:`launch_kwargs`.

Every GEMM call site has its own key, as vLLM's fused_moe keeps one tuned JSON per (N, K, device, dtype) bucketed by
M: ``site|dtype|M<bucket>|N<n>|K<k>`` with M rounded up to a power of two and N, K exact (the row-wise kernels,
"rows", have no N/K). So fc2 with its fp32 A operand, out_proj, the router's d_hid with K = 12 and training GEMM1 no
longer share the first winner of a coarse "gemm|dtype|large" key. :data:`SITES` names every site and its family;
the family gives the static defaults and the autotune candidates. A config is found, in order:
  1. GEOALIGN_AUTOTUNE=1 (CUDA only): :func:`tune` times every candidate of the site's family on the first call of a
     key (triton.testing.do_bench, median; buffers the kernel updates in place are restored after each timing),
     keeps the fastest for the process and, when :data:`TUNE_OUT` is set, rewrites that table after every key;
  2. tuned_configs.json beside this file: {device name: {key: config}}, committed from a GPU run (the exact key,
     else a family-wide "family|dtype|small|large" entry of earlier releases). None exists yet: no GPU has run this
     repository's kernels (see the README, "Benchmark");
  3. the static defaults below: per site, else per family, for H100/H200 (device class by name) or "default", by
     shape class ("small": < 1024 rows). The Hopper entries are starting points reasoned from each site's shape and
     checked for registers / spills / pipelining by aot_check (sm_90, triton 3.6), NOT timed on a GPU.
Under the Triton interpreter (TRITON_INTERPRET=1) every site uses small fixed blocks and no autotune, so CPU tests
stay fast and deterministic. :data:`PLANNING` (set by precompile.planning_target) makes CPU tensors get a named
GPU's configs and SM count, to record what that GPU would launch.

families: "gemm" (the shared GEMM: output stage, router and weight gradients), "bank_gemm1" (GEMM1 over the
normalised rows), "bank_weight_grad" (the weight-gradient GEMM dz^T x_hat and its epilogue), "rows" (row-wise
kernels: gather + normalise, dz / d alpha, routing; BLOCK_SIZE_M rows per program, BLOCK_SIZE_N the column chunk;
not tuned).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from . import runtime
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
    # two fp32 accumulators (dW1 and M_j): 128 x 128 spills (aot_check, bf16 sm_90), 128 x 64 does not
    ("bank_weight_grad", "small"): _cfg(128, 64, 32, 8, 3),
    ("bank_weight_grad", "large"): _cfg(128, 64, 64, 8, 3),
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

#: every GEMM call site -> its family (static defaults, autotune candidates). A family name is a site of its own.
SITES = {
    # output stage (training): f_hat = h_bar [L, H] (fp32 A) @ W2^T + b2; q_hat = f_hat @ W_out^T + q
    "fc2": "gemm", "out_proj": "gemm",
    # output stage (inference, folded): q_hat = h_bar @ (W_out W2)^T + W_out b2 + q, and the fold itself
    "folded_output": "gemm", "fold_weights": "gemm",
    # output backward: dF = dQ W_out (+ dF_hat), dW_out = dQ^T f_hat, dW2 = dF^T h_bar (+ db2), dh_bar = dF W2
    "d_f": "gemm", "d_out_weight": "gemm", "d_fc2_weight": "gemm", "d_h_bar": "gemm",
    # router backward: d_hid = dS [L, M] @ W2 [M, R] (K = M bank layers), dW2 = dS^T hid (split-K, + db2)
    "router_d_hid": "gemm", "router_d_w2": "gemm",
    # the bank: GEMM1 over every taped pair (training) or one layer's pairs (inference); dW1 = dz^T x_hat
    "gemm1_train": "bank_gemm1", "gemm1_infer": "bank_gemm1", "weight_grad": "bank_weight_grad",
    "gemm": "gemm", "bank_gemm1": "bank_gemm1", "bank_weight_grad": "bank_weight_grad", "rows": "rows",
}
#: the sites whose reduction runs over the tokens (weight gradients): their K changes with every frame count, so
#: their key buckets K by powers of two as it does M (an exact K would re-tune every batch length)
TOKEN_K_SITES = frozenset({"d_out_weight", "d_fc2_weight", "router_d_w2", "weight_grad", "bank_weight_grad"})

#: per-site Hopper defaults where the family's do not fit the site's shape (paper scale: L = 8064, D = D' = 2048,
#: H = 4096, M = 12 layers, R = 512): K = 12 needs no 64-wide K step; fc2's fp32 A tile doubles its shared memory
_HOPPER_SITES = {
    ("router_d_hid", "large"): _cfg(128, 128, 16, 4, 3),
    ("router_d_hid", "small"): _cfg(64, 128, 16, 4, 3),
    ("fc2", "large"): _cfg(128, 128, 32, 8, 4),
}
SITE_CONFIGS = {"H100": _HOPPER_SITES, "H200": _HOPPER_SITES, "default": {}}

#: planning on a machine without the GPU: (device name, multiprocessor count, major compute capability) whose
#: configs, split-K and TMA choice the launchers use for CPU tensors (set by precompile.planning_target)
PLANNING: tuple | None = None
#: GEOALIGN_TMA: "auto" (the default: the shared GEMM reads its operands through TMA descriptors on sm_90 and newer,
#: where the operand allows it; pointer loads elsewhere), "1" (wherever Triton runs, the interpreter included),
#: "0" (pointer loads only: today's path, the fallback)
TMA = os.environ.get("GEOALIGN_TMA", "auto")
#: GEOALIGN_PERSISTENT=1: the shared GEMM (without split-K) on a persistent grid, about one program per SM looping
#: over the tiles. Off by default until a GPU run measures it
PERSISTENT = os.environ.get("GEOALIGN_PERSISTENT", "0") == "1"
#: programs of a persistent grid where there is no SM count (the interpreter): few, so that each loops
_PERSISTENT_PROGRAMS_OFF_GPU = 3
#: when set (a path), :func:`tune` merges this process's choices into that table after every key it times
TUNE_OUT: str | None = os.environ.get("GEOALIGN_TUNE_OUT") or None

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


def m_bucket(rows: int) -> int:
    """M rounded up to a power of two (at least 16): the row dimension of a tuning key."""
    return max(16, 1 << max(0, int(rows) - 1).bit_length())


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "any"


def table_key(site: str, dtype: torch.dtype | None, rows: int, n: int | None = None, k: int | None = None) -> str:
    """"site|dtype|M<bucket>|N<n>|K<k>" (N/K left out when not given; K bucketed too where it runs over the
    tokens, :data:`TOKEN_K_SITES`), the key of tuned_configs.json and of the autotune cache."""
    key = f"{site}|{_dtype_name(dtype)}|M{m_bucket(rows)}"
    if n is not None:
        key += f"|N{int(n)}"
    if k is not None:
        key += f"|K{m_bucket(k) if site in TOKEN_K_SITES else int(k)}"
    return key


def family_of(site: str) -> str:
    """The family of GEMM call site ``site`` (ValueError naming the known sites for an unknown one)."""
    site = current_op_name(site)
    if site not in SITES:
        raise ValueError(f"geoalign_kernels.configs: unknown GEMM site {site!r}; expected one of {sorted(SITES)}")
    return SITES[site]


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


def config_for(op: str, rows: int, name: str, dtype: torch.dtype | None = None, n: int | None = None,
               k: int | None = None) -> dict:
    """The config of GEMM site ``op`` with ``rows`` x ``n`` output and reduction length ``k`` on the CUDA device
    called ``name``: this process's autotune choice, else the tuned table's entry (the exact key, else an earlier
    release's family-wide key), else the site's static default, else its family's, for the device class."""
    op = current_op_name(op)
    family = family_of(op)
    key = table_key(op, dtype, rows, n, k)
    table = tuned_table().get(name, {})
    found = (_SESSION.get(name, {}).get(key) or table.get(key)
             or table.get(f"{family}|{_dtype_name(dtype)}|{shape_class(rows)}"))
    if found is not None:
        cfg = {k: int(found[k]) for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")}
    else:
        cls = device_class(name)
        cfg = dict(SITE_CONFIGS[cls].get((op, shape_class(rows))) or CONFIGS[cls][(family, shape_class(rows))])
    if dtype == torch.float64:
        cfg["BLOCK_SIZE_K"] = min(cfg["BLOCK_SIZE_K"], 32)
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    return cfg


def _target_name(device: torch.device) -> str | None:
    """The GPU whose configs ``device``'s launches take: its own name on CUDA, the planned GPU's for CPU tensors
    while :data:`PLANNING` is set, None under the interpreter or on a CPU."""
    if INTERPRET:
        return None
    if device.type == "cuda":
        return device_name(device.index or 0)
    return PLANNING[0] if PLANNING is not None else None


def tma_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether launches on ``device`` with operands of ``dtype`` read GEMM operands through TMA descriptors
    (:data:`TMA`). "auto" takes TMA for the tensor-core dtypes only (bf16, fp16, and fp32 with runtime.TF32): on
    the exact fp32 / fp64 FMA path the operands go through registers anyway, and its TMA builds spill (aot_check:
    8-17 KB, sm_90)."""
    if TMA not in ("auto", "0", "1"):
        raise ValueError(f"GEOALIGN_TMA must be auto, 0 or 1; got {TMA!r}")
    if TMA != "auto":
        return TMA == "1"
    if INTERPRET:
        return False
    if dtype == torch.float64 or (dtype == torch.float32 and not runtime.TF32):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return PLANNING is not None and PLANNING[2] >= 9


def persistent_programs(device: torch.device, tiles: int) -> int:
    """Programs of the shared GEMM's grid for ``tiles`` output tiles: ``tiles`` (one per tile) unless
    :data:`PERSISTENT`, then at most one per SM (a few off a GPU), each looping over its share of the tiles."""
    if not PERSISTENT:
        return tiles
    return max(1, min(tiles, num_sms(device) or _PERSISTENT_PROGRAMS_OFF_GPU))


def num_sms(device: torch.device) -> int | None:
    """Multiprocessors of ``device`` (the planned GPU's for CPU tensors while planning); None off CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return PLANNING[1] if PLANNING is not None and not INTERPRET else None


def get_config(op: str, rows: int, device: torch.device, dtype: torch.dtype | None = None, n: int | None = None,
               k: int | None = None) -> dict:
    """{BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps, num_stages} for GEMM site ``op`` with ``rows`` x ``n``
    output and reduction length ``k`` on ``device``; ``dtype`` is the operand dtype (fp64 tiles are halved in K and
    get 2 stages to fit shared memory)."""
    name = _target_name(device)
    if name is None:
        family_of(op)  # an unknown site is an error here too
        cfg = dict(_INTERPRETER)
    else:
        cfg = config_for(op, rows, name, dtype, n, k)
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


def tune(op: str, rows: int, device: torch.device, dtype: torch.dtype | None, launch, restore=(),
         n: int | None = None, k: int | None = None) -> dict:
    """The config to launch GEMM site ``op`` with (``rows`` x ``n`` output, reduction length ``k``): with
    GEOALIGN_AUTOTUNE=1 on a CUDA device, the fastest candidate of the site's family for this (device, site, dtype,
    M bucket, N, K), timed on the first call (``launch(cfg)`` runs the kernel; ``restore`` as in :func:`choose`)
    and kept for the process (and written to :data:`TUNE_OUT` at once when set); otherwise :func:`get_config`.
    While planning (no GPU: launches only record) each candidate is launched once, untimed."""
    op = current_op_name(op)
    name = _target_name(device)
    family = family_of(op)
    if not AUTOTUNE or name is None or family not in CANDIDATES:
        return get_config(op, rows, device, dtype, n, k)
    key = table_key(op, dtype, rows, n, k)
    if key not in _SESSION.get(name, {}):
        base = config_for(op, rows, name, dtype, n, k)
        candidates = [base] + [c for c in CANDIDATES[family] if c != base]
        if dtype == torch.float64:
            candidates = [c for c in candidates if c["BLOCK_SIZE_K"] <= 32 and c["num_stages"] <= 2] or [base]
        bench = None if device.type == "cuda" else (lambda fn: (fn(), 0.0)[1])  # planning: record, no timing
        best, timings = choose(candidates, launch, restore, bench=bench)
        ms = min(t for _, t in timings if isinstance(t, float))
        _SESSION.setdefault(name, {})[key] = {**best, "ms": ms, "default_ms": timings[0][1]}
        if TUNE_OUT and device.type == "cuda":
            write_tuned(TUNE_OUT)  # a run cut off later keeps every key timed so far
    return get_config(op, rows, device, dtype, n, k)


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
    write_atomic(path, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())
    _TABLE_CACHE.clear()
    return table


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` crash-safely: a temporary file beside it, fsync, rename, fsync of the folder. (The
    kernel package does not import geoalign, whose geoalign.atomic_files does the same for everything else.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def launch_kwargs(cfg: dict, *, group: bool = False) -> dict:
    """The keyword arguments of a tiled kernel launch: the three block sizes, num_warps, num_stages (and
    GROUP_SIZE_M for kernels launched in grouped order)."""
    kw = {key: cfg[key] for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")}
    if group:
        kw["GROUP_SIZE_M"] = GROUP_SIZE_M
    return kw
