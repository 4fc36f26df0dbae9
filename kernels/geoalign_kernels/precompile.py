"""Compile ahead: record every Triton kernel variant a workload launches, without compiling or launching any, then
build the records in a process pool into the Triton cache, so that a later process launching the same variants
only loads them (bench/gpu_proof.sh does this while csrc/ builds: bench/proof_plan.py, the README's "GPU" part).

    with Recorder() as rec:
        workload()                                   # no Triton kernel compiles or runs: outputs stay unwritten
    with BuildPool(workers=12, cache_dir="/tmp/triton-cache") as pool:
        pool.submit(rec.records)                     # (submit more while they build)
        builds = pool.results()

A record is what Triton's own ``JITFunction.preload`` takes (``serialize_specialization_data``: the signature, the
constexprs, the specialisation attributes and the compile options the JIT computed from the launch's arguments),
plus the kernel's module, name and target. The pool builds each one with ``triton.compile`` on exactly those inputs,
so the cache key is the JIT's own: a launch in any process with the same TRITON_CACHE_DIR finds it (tested on the
CPU: tests/test_precompile.py relaunches a recorded workload in compile-only mode and counts new cache entries).

Recording needs Triton's JIT (TRITON_INTERPRET unset) and an active driver. On a CUDA machine that is the real one.
On a CPU, :func:`planning_target` installs a stand-in driver for a named target and makes the kernels' launchers
choose their configs as on a named GPU, so that the plan of a GPU run can be measured here (bench/gpu_proof.py
--plan): what would compile, and how long each build takes for sm_90 on this machine.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

#: cache-invalidating settings a pool worker must share with the launching processes
_COMPILE_ENV = ("TRITON_CACHE_DIR", "TRITON_HOME")


class Recorder:
    """While active, every Triton JIT launch records its compile inputs (once per distinct variant) and neither
    compiles nor runs: ``records`` is the list, in first-launch order, of dicts {module, name, target,
    specialization} (specialization: Triton's serialised specialisation data, a JSON string)."""

    def __init__(self):
        self.records: list[dict] = []
        self._seen: set = set()
        self._previous = None

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
        from triton.runtime.driver import driver

        data = compile["specialization_data"]
        target = driver.active.get_current_target()
        ident = (fn.module, fn.name, data)
        if ident not in self._seen:
            self._seen.add(ident)
            self.records.append({"module": fn.module, "name": fn.name, "specialization": data,
                                 "target": [target.backend, target.arch, target.warp_size]})
        return True  # "handled": the JIT returns without compiling or launching

    def __enter__(self) -> "Recorder":
        from triton import knobs

        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("precompile.Recorder needs Triton's JIT: unset TRITON_INTERPRET before importing")
        self._previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook = self._previous


@contextlib.contextmanager
def compile_only():
    """While active, Triton JIT launches compile (or load from the cache) but do not run: ``run(warmup=True)``,
    Triton's own warm-up path. Used to check that a precompiled cache is hit."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _decode(record: dict):
    """(fn, signature, constexprs, attrs, options, target) from a record, as Triton's JITFunction.preload decodes
    its specialisation data."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(record["module"]), record["name"].rsplit(".", 1)[-1])
    data = json.loads(record["specialization"])
    if not data["name"].endswith(record["name"]):
        raise RuntimeError(f"precompile: the record of {record['name']} holds {data['name']}'s specialisation")

    def as_tuple(value):
        return tuple(as_tuple(v) for v in value) if isinstance(value, list) else value

    def constant(value):
        if isinstance(value, str) and tl.dtype.is_dtype(value):
            return tl.dtype(value)
        if isinstance(value, dict) and "constexpr" in value:
            return tl.constexpr(as_tuple(value["constexpr"]))
        return as_tuple(value)

    constexprs = {tuple(k): constant(v) for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    signature = {k: as_tuple(v) for k, v in data["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    return fn, signature, constexprs, attrs, options, GPUTarget(*record["target"])


def compile_record(record: dict) -> dict:
    """Build one record with triton.compile (into this process's TRITON_CACHE_DIR), then its C launcher where the
    Triton has one per signature (3.6 compiles a small C module for each on a kernel's first launch; 3.9 has a
    generic one): {kernel, seconds, error, launcher} with launcher "built", or why not (no libcuda here, ...)."""
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    launcher = None
    try:
        fn, signature, constexprs, attrs, options, target = _decode(record)
        src = ASTSource(fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=target, options=options)
        error = None
        if target.backend == "cuda":
            try:
                from triton.backends.nvidia.driver import CudaLauncher

                CudaLauncher(src, kernel.metadata)  # builds (or loads from the cache) the launcher; no CUDA context
                launcher = "built"
            except Exception as exc:  # e.g. no libcuda on a CPU machine: the first launch builds it
                launcher = f"not built: {type(exc).__name__}: {exc}"[:200]
    except Exception as exc:  # reported per record: the run goes on and the launch compiles it itself
        error = f"{type(exc).__name__}: {exc}"[:500]
    return {"kernel": record["name"], "seconds": round(time.perf_counter() - t0, 3), "error": error,
            "launcher": launcher}


def _init_worker(env: dict) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(env)


class BuildPool:
    """A pool of ``workers`` spawned processes (no CUDA context is inherited) building records into ``cache_dir``
    (default: this process's TRITON_CACHE_DIR or Triton's default) as they are submitted, so that one stage's
    records build while the next stage records. ``results()`` waits for every build."""

    def __init__(self, workers: int, cache_dir: str | None = None):
        import multiprocessing

        env = {k: os.environ[k] for k in _COMPILE_ENV if k in os.environ}
        if cache_dir is not None:
            env["TRITON_CACHE_DIR"] = str(cache_dir)
        self.workers = max(1, workers)
        self.started = time.perf_counter()
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(env,))
        self._futures: list = []
        self._seen: set = set()

    def submit(self, records: list[dict]) -> int:
        """Queue the records not queued before, the slowest kernels first; returns how many were new."""
        new = [r for r in records if (r["module"], r["name"], r["specialization"]) not in self._seen]
        for r in sorted(new, key=lambda r: -_expected_cost(r)):
            self._seen.add((r["module"], r["name"], r["specialization"]))
            self._futures.append((r, self._pool.submit(compile_record, r)))
        return len(new)

    def results(self) -> dict:
        """{builds: [{kernel, seconds, error, launcher}] in submission order, seconds: wall time since the pool
        started, workers}. A worker that dies is one error per build it took down; the rest still report."""
        builds = []
        for record, future in self._futures:
            try:
                builds.append(future.result())
            except Exception as exc:  # BrokenProcessPool: a worker crashed (not raised)
                builds.append({"kernel": record["name"], "seconds": 0.0, "launcher": None,
                               "error": f"{type(exc).__name__}: {exc}"[:500]})
        return {"builds": builds, "seconds": round(time.perf_counter() - self.started, 2), "workers": self.workers}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BuildPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compile_records(records: list[dict], workers: int, cache_dir: str | None = None) -> dict:
    """Build every record in a :class:`BuildPool` of ``workers`` processes into ``cache_dir``; returns its
    results()."""
    with BuildPool(workers, cache_dir) as pool:
        pool.submit(records)
        return pool.results()


def _expected_cost(record: dict) -> int:
    """A rough order for the pool: the tensor-core GEMMs (a BLOCK_SIZE_K and a dot) build slowest."""
    name = record["name"]
    gemm = "matmul" in name or "gemm" in name or "grad" in name
    return 2 if gemm and "BLOCK_SIZE_K" in record["specialization"] else 1


@contextlib.contextmanager
def planning_target(device_name: str = "NVIDIA H100 80GB HBM3", capability: int = 90, num_sms: int = 132):
    """On a machine without that GPU: Triton's JIT sees a stand-in CUDA driver for sm_``capability`` (so launches
    specialise and, under a :class:`Recorder`, record as they would there), and the kernels' launchers pick their
    configs and split-K as on ``device_name`` with ``num_sms`` multiprocessors. Tensors stay where they are (CPU);
    nothing may actually launch: use it only around a Recorder or compile_only()."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from . import configs

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("planning_target needs Triton's JIT: unset TRITON_INTERPRET before importing")

    class _PlanningDriver:
        def is_active(self):
            return True

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    previous_active = driver._active
    previous_plan = configs.PLANNING
    driver.set_active(_PlanningDriver())
    configs.PLANNING = (device_name, num_sms, capability // 10)
    try:
        yield
    finally:
        driver._active = previous_active
        configs.PLANNING = previous_plan
