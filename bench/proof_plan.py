"""The GPU proof's time plan: the Triton kernel variants each stage launches (recorded without compiling or running
any: geoalign_kernels.precompile), their builds in a process pool into the Triton cache every stage shares, and the
plan of the whole run against its one device call.

    python -m bench.proof_plan measure [--out bench/results/proof_plan.json] [--workers 2]
        on a CPU: record every stage's launches as on an H100 (paper scale, bf16), build each variant for sm_90
        with Triton's compiler here, time each build, and write the measurement (committed)
    python -m bench.proof_plan show [--measurement FILE]
        the plan from a measurement: set-up, csrc build in parallel with the precompile pool, then every stage
    python -m bench.proof_plan precompile OUT_JSON [--workers N]      (on the GPU: bench/gpu_proof.sh runs it)

The plan fits when set-up + max(csrc build cap, precompile) + the stage budgets leave SPARE_S of TOTAL_S; the dry
run of the proof prints it and fails when it does not fit (tests/test_gpu_proof.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENT = ROOT / "bench" / "results" / "proof_plan.json"

#: the device call's limit, what bench/gpu_proof.sh is given, and what must be left over
CALL_S, TOTAL_S, SPARE_S = 540, 520, 60
#: the set-up's parts, each capped by a timeout in bench/gpu_proof.sh
SETUP_S = 30  # nvidia-smi, pip install --no-deps -e . (no build: csrc/ is built by the JIT loader)
CSRC_BUILD_CAP_S = 120  # ninja, 4 jobs beside the pool (3 .cu files and the binding against torch's headers)
#: the GPU machine's cores (KINDS.md: 16) less those left to the csrc build
POOL_WORKERS = 12
#: stage budgets in order of value (bench/gpu_proof.py STAGES reads them); pytest takes what is left, untimed here
#: (not measured: no GPU has run them; each is GPU work on precompiled kernels, a timeout keeps what was recorded)
STAGE_BUDGETS = [("ceilings", 10), ("parity", 45), ("fusion", 60), ("tune", 45), ("encoder", 30), ("training", 30),
                 ("compiled", 45), ("pytest", 0)]
#: the stages whose launches are recorded and precompiled (the others' few variants compile at run time, and the
#: proof counts them: gpu_proof.json "triton_builds" per stage)
RECORDED = ("parity", "fusion", "tune", "training")


# ------------------------------------------------------------------------------------------------------ recording
def _fusion_inputs(cfg, frames_or_L, dtype, device):
    """q, layers, gather_index, grad for a fusion of ``cfg``: (frames,) = the real VGGT/Qwen alignment, an int = L
    random rows; q, layers and grad uninitialised (recording runs no kernel, so their values are never read)."""
    import torch

    from .gpu_proof import parity_gather_index

    gather_index, N = parity_gather_index(cfg, frames_or_L, device, torch.Generator().manual_seed(8))
    L = gather_index.shape[0]
    def make(*shape):
        return torch.empty(*shape, device=device, dtype=dtype)

    q = make(L, cfg.hidden_size)
    layers = [make(N, cfg.geo_dim) for _ in range(cfg.num_bank_layers)]
    return q, layers, gather_index, make(L, cfg.hidden_size)


def _fwd_bwd(fusion, q, layers, gather_index, grad, infer: bool = True):
    import torch

    qq = q.detach().requires_grad_()
    fusion(qq, layers, gather_index, backend="triton").backward(grad)
    if infer:
        with torch.no_grad():
            fusion(q, layers, gather_index, backend="triton")


def record_stage(stage: str, device, dtype, dry: bool) -> list:
    """The records of the Triton launches one recorded stage of the proof makes (geoalign_kernels.precompile
    .Recorder: nothing compiles or runs). On a CPU call it inside precompile.planning_target()."""
    from geoalign import GeoAlignFusion
    from geoalign_kernels import configs, guard
    from geoalign_kernels.precompile import Recorder

    from .gpu_proof import DRY_SHAPE, parity_small_config
    from .shapes import SHAPES

    shape = DRY_SHAPE if dry else SHAPES["paper"]
    frames = 1 if dry else 32

    def fusion_of(cfg):
        f = GeoAlignFusion(cfg).to(device=device, dtype=dtype)
        f.check_inputs = False
        return f

    with Recorder() as rec:
        if stage == "parity":  # run with GEOALIGN_GUARD=1: guarded buffers sit at other addresses
            # (its host checks of index values are left out: no kernel runs, so the routes are never written)
            previous = guard.ENABLED, guard.check_index_range
            guard.ENABLED, guard.check_index_range = True, lambda *args, **kwargs: None
            try:
                for cfg, where in ((shape.config(), (frames,)), (parity_small_config(dry), 37 if dry else 301)):
                    q, layers, gi, g = _fusion_inputs(cfg, where, dtype, device)
                    _fwd_bwd(fusion_of(cfg), q, layers, gi, g, infer=False)
            finally:
                guard.ENABLED, guard.check_index_range = previous
        elif stage in ("fusion", "tune"):
            cfg = shape.config()
            q, layers, gi, g = _fusion_inputs(cfg, (frames,), dtype, device)
            fusion = fusion_of(cfg)
            if stage == "fusion":
                _fwd_bwd(fusion, q, layers, gi, g)
            else:  # every autotune candidate of every site a training step reaches
                previous, previous_session = configs.AUTOTUNE, configs._SESSION
                configs.AUTOTUNE, configs._SESSION = True, {}
                try:
                    _fwd_bwd(fusion, q, layers, gi, g, infer=False)
                finally:
                    configs.AUTOTUNE, configs._SESSION = previous, previous_session
        elif stage == "training":
            _record_training(device)
        else:
            raise ValueError(f"stage {stage!r} is not recorded; expected one of {RECORDED}")
    return rec.records


def _record_training(device) -> None:
    """The training stage's launches at its shapes and dtypes: one step of the tiny model as GeoAlignTrainer runs it
    with precision="bf16" (accelerate's mixed precision: fp32 parameters under bf16 autocast, so the trainable
    fusion runs its fp32 kernels), then the stage's generate() in bf16 (a forward under no_grad)."""
    import torch

    from geoalign.tiny import build_inputs, random_frames, tiny_model

    def inputs_on(tok):
        inputs = build_inputs(tok, [random_frames(2, 70, 84), random_frames(3, 56, 98, seed=1)], 4, answer="ok")
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else [x.to(device) for x in v])
                for k, v in inputs.items()}

    model, tok = tiny_model(4, seed=0, backend="triton")
    model = model.to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model(**inputs_on(tok))
    out.logits.float().sum().backward()
    model, tok = tiny_model(4, seed=0, backend="auto" if device.type == "cuda" else "triton")
    model = model.to(device, torch.bfloat16).eval()
    with torch.no_grad():
        model(**inputs_on(tok))


def precompile(out_json: str | None, workers: int, dry: bool = False, device=None, dtype=None) -> dict:
    """Record the recorded stages' launches, one stage at a time, and build each stage's new variants in a pool of
    ``workers`` while the next one records, into this process's TRITON_CACHE_DIR. A stage whose recording fails
    loses only its own records (reported). Returns (and writes to out_json) {stages: {stage: variants}, variants,
    record_s, compile_s, startup_s, workers, builds: [{kernel, seconds, error, launcher}], errors,
    record_errors}."""
    import torch

    from geoalign_kernels.precompile import BuildPool

    device = device or torch.device("cuda")
    dtype = dtype or torch.bfloat16
    stages, record_errors, record_s = {}, {}, 0.0
    with BuildPool(workers) as pool:
        for stage in RECORDED:
            t0 = time.perf_counter()
            try:
                records = record_stage(stage, device, dtype, dry)
                stages[stage] = len(records)
                pool.submit(records)
            except Exception as exc:
                record_errors[stage] = f"{type(exc).__name__}: {exc}"[:500]
            record_s += time.perf_counter() - t0
        built = pool.results()
    builds = built["builds"]
    build_cpu_s = sum(b["seconds"] for b in builds)
    result = {"stages": stages, "variants": len(builds), "record_s": round(record_s, 2),
              "compile_s": built["seconds"], "workers": workers, "build_cpu_s": round(build_cpu_s, 2),
              # the pool's own cost beyond its builds: spawning workers that import torch and triton
              "startup_s": round(max(0.0, built["seconds"] - record_s - build_cpu_s / workers), 2),
              "builds": builds, "errors": [b for b in builds if b["error"]], "record_errors": record_errors}
    if out_json:
        from geoalign.atomic_files import write_text

        write_text(out_json, json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------------------ plan
def plan(measurement: dict, workers: int = POOL_WORKERS) -> dict:
    """The run's phases in seconds from a measurement (``measure``'s JSON): set-up, then the csrc build and the
    precompile pool side by side (the pool's makespan: its builds' total over ``workers``, at least the longest
    build, plus the recording), then every stage's budget. fits: the total leaves SPARE_S of TOTAL_S."""
    builds = [b["seconds"] for b in measurement["builds"]]
    pool = (max(sum(builds) / workers, max(builds, default=0.0)) + measurement["record_s"]
            + measurement.get("startup_s", 0.0))
    phases = [("setup", SETUP_S), ("csrc build || precompile", max(CSRC_BUILD_CAP_S, pool))]
    phases += [(f"stage {name}", budget) for name, budget in STAGE_BUDGETS if budget]
    total = sum(s for _, s in phases)
    return {"phases": phases, "precompile_s": round(pool, 1), "variants": measurement["variants"],
            "total_s": total, "limit_s": TOTAL_S, "spare_s": TOTAL_S - total, "fits": TOTAL_S - total >= SPARE_S,
            "pytest_s": TOTAL_S - total}


def format_plan(p: dict) -> str:
    lines = [f"time plan of the GPU proof ({TOTAL_S} s of the device call's {CALL_S} s; {p['variants']} Triton "
             f"variants precompiled, {p['precompile_s']:.0f} s in the pool):"]
    lines += [f"  {name:<28} {seconds:6.0f} s" for name, seconds in p["phases"]]
    lines.append(f"  {'total':<28} {p['total_s']:6.0f} s   spare {p['spare_s']:.0f} s (needed {SPARE_S}): "
                 f"{'fits' if p['fits'] else 'DOES NOT FIT'}; pytest -m gpu runs last, in what is left")
    return "\n".join(lines)


def load_measurement(path=MEASUREMENT) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"proof_plan: cannot read the measurement {path} ({exc}); run "
                         "`python -m bench.proof_plan measure` on a CPU machine") from exc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="record as on an H100 and time every sm_90 build here")
    m.add_argument("--out", default=str(MEASUREMENT))
    m.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    m.add_argument("--dry", action="store_true", help="the dry run's tiny shapes (tests)")
    s = sub.add_parser("show", help="the plan from a measurement")
    s.add_argument("--measurement", default=str(MEASUREMENT))
    c = sub.add_parser("precompile", help="on the GPU: record and build every variant into TRITON_CACHE_DIR")
    c.add_argument("out_json")
    c.add_argument("--workers", type=int, default=POOL_WORKERS)
    args = p.parse_args(argv)
    if args.cmd == "show":
        print(format_plan(plan(load_measurement(args.measurement))))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("proof_plan: recording needs Triton's JIT; run without TRITON_INTERPRET=1")
    if args.cmd == "precompile":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("proof_plan precompile: no CUDA device here (it records on the GPU); on a CPU, "
                             "`python -m bench.proof_plan measure` records as an H100 would")
        res = precompile(args.out_json, args.workers)
        print(f"precompile: {res['variants']} variants ({res['stages']}), recorded in {res['record_s']} s, built in "
              f"{res['compile_s']} s on {res['workers']} workers; {len(res['errors'])} failed; stages not recorded: "
              f"{res['record_errors'] or 'none'}", flush=True)
        return 0
    import torch

    import geoalign.backends as backends
    from geoalign_kernels.precompile import planning_target

    backends.triton_available = lambda: True  # the planned GPU has Triton; launches only record
    with planning_target():
        res = precompile(None, args.workers, dry=args.dry, device=torch.device("cpu"), dtype=torch.bfloat16)
    res.update(measured_on=f"{os.cpu_count()} CPU cores here, {args.workers} build workers", target="sm_90",
               planned_device="NVIDIA H100 80GB HBM3", measured=time.strftime("%Y-%m-%d"),
               triton=__import__("triton").__version__, dry=args.dry)
    from geoalign.atomic_files import write_text

    write_text(args.out, json.dumps(res, indent=1))
    print(f"measured {res['variants']} variants {res['stages']}: {res['build_cpu_s']} s of builds, "
          f"{res['compile_s']} s on {args.workers} workers; {len(res['errors'])} failed -> {args.out}")
    print(format_plan(plan(res)))
    return 0 if not res["errors"] and not res["record_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
