"""The GPU proof (issue 14): bf16 parity, paper-scale speed and memory, GPU training and inference, in one prepared
run that fits a 15-minute device lease.

    bash bench/gpu_proof.sh OUT                 # on the GPU machine: install (--no-deps), build csrc/, run this
    python -m bench.gpu_proof OUT [--dry-run] [--stages NAME ...] [--total-s SECONDS]

Before the stages, bench/gpu_proof.sh builds csrc/ and, side by side, precompiles every Triton variant the parity,
fusion, tune and training stages launch into one TRITON_CACHE_DIR that every stage shares (bench/proof_plan.py;
the time plan, measured on a CPU, is printed by the dry run, which fails when it does not fit).

Stages, in order of value, each in a child process of its own under its own time budget (bench/proof_plan.py
STAGE_BUDGETS), so that a CUDA fault, an out-of-memory or a hang in one stage cannot take the others down. A stage
that fails or runs out of time records its error next to what it had finished, and the run goes on. Stage children
die with the run: their process groups are killed when it exits, times out or gets SIGTERM, and each child gets
SIGKILL if its parent dies (PR_SET_PDEATHSIG). Each stage records how many Triton kernels it still had to build
("triton_builds": new entries in the shared cache).

  ceilings  a bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s)
  parity    bf16 triton and cuda (and torch, as the yardstick) against reference computed in fp32 on the same
            values, forward and every gradient, at paper widths with L = 8064 (32 frames) and at a small odd shape:
            ||out - ref|| / ||ref|| per tensor, and passed per backend. The bf16 router flips the Top-K set of
            ~0.5% of tokens against fp32 logits (near-ties); each flip moves gradients by a whole layer's share, so
            the per-tensor comparison is made against the fp32 reference run on the backend's own routes, and the
            Top-K agreement with the unforced fp32 reference is reported (and required >= 98%) on its own
  fusion    the fusion table at paper scale in bf16 (L = 8064, M = 12, K = 2, G = 4, D = D' = 2048, H = 4096):
            fwd, bwd, fwdbwd, infer for reference, torch, triton and cuda (the `geoalign bench` row format), then
            the device time of every kernel of one triton fwd+bwd (torch.profiler): GEMM1's own time and % of the
            measured peak, and where the rest goes
  tune      GEOALIGN_AUTOTUNE's search for the triton GEMMs at paper scale, one key per call site
            (geoalign_kernels.configs): the triton fwd+bwd time with the default tiles and with the tuned ones; the
            table (tuned_configs.json, to be committed beside configs.py) is rewritten after every key
  encoder   a VGGT-1B-sized aggregator (random weights) + fusion at 32 frames: streaming the bank layers vs
            keeping VGGT's layer list, time and peak memory
  training  one GeoAlignTrainer run (2 optimizer steps) of the tiny model on CUDA in bf16, single process; then
            generate() on CUDA with sdpa, and with flash-attention 2 if it imports
  compiled  the fusion table's rows for compiled-reference (torch.compile of the reference: its compile time is the
            least predictable part of the run)
  pytest    (with the time that is left) python -m pytest -m gpu: tests/test_triton_kernels.py first (bf16 parity,
            int64 offsets, the CUDA-graph capture of a fusion step under sync-debug "error"), then the rest; each
            result streamed to the log

--dry-run runs the same stages on the CPU at tiny shapes with the backends available there (Triton under the
interpreter; the fusion table in two modes, fwdbwd and infer; pytest only collects the gpu tests);
tests/test_gpu_proof.py runs it, so the script cannot rot between GPU sessions.

Output in OUT: gpu_proof.json (rewritten after every stage), gpu_proof.log (every child's output), fusion.png and
encoder.png and tuned_configs.json: five files, inside the device tool's eight.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .shapes import SHAPES, FusionShape

ROOT = Path(__file__).resolve().parents[1]

from .proof_plan import STAGE_BUDGETS

#: (stage, nominal seconds on the GPU; 0: what is left), in order of value; the dry run gives each stage the same
#: budget (the test's CPU is slow)
STAGES = list(STAGE_BUDGETS)
STAGE_NAMES = [s for s, _ in STAGES]
#: seconds kept back for every later stage when the run is short of time
MIN_STAGE_S = 20
#: parity passes when every tensor's ||out - ref|| / ||ref|| is below this, nothing is NaN and at least
#: TOPK_AGREEMENT of the tokens keep the fp32 reference's Top-K. bf16 has a unit roundoff of 2^-8 = 3.9e-3; the
#: fusion chains ~6 roundings (operands, GEMM1 output z, GELU, h_bar's fp32 add, the two output GEMMs), and the
#: gradients sum n = L*K/M ~ 1344 bf16 products per entry, so errors of 1e-2 are bf16 doing its work; 3e-2 keeps a
#: factor ~3 and is still ~30x below what a dropped pair, a wrong LayerNorm or a missed token would give (>= 0.3)
PARITY_TOL = 3e-2
TOPK_AGREEMENT = 0.98

#: the dry run's fusion widths (the interpreter runs the Triton kernels, so they must be small)
DRY_SHAPE = FusionShape("dry", 32, 24, 40, 16, num_layers=4)

#: test hook: a comma-separated list of "stage:fail" / "stage:hang" makes those stages raise or sleep
#: (tests/test_gpu_proof.py)
FAULT_ENV = "GEOALIGN_PROOF_FAULT"


# ------------------------------------------------------------------------------------------------------- the parent
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the backends available here")
    p.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=STAGE_NAMES)
    p.add_argument("--total-s", type=float, default=480.0, help="wall-clock budget of all stages together")
    p.add_argument("--stage-s", type=float, default=None, help="override every stage's budget (tests)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one stage (internal)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args.child, args.out, args.part, args.dry_run)

    from .proof_plan import format_plan, load_measurement, plan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.total_s
    time_plan = plan(load_measurement())
    print(format_plan(time_plan), flush=True)
    report = {"issues": [14, 31], "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "environment": _environment(), "plan": time_plan, "stages": {}}
    if (out / "precompile.json").exists():  # bench/gpu_proof.sh's precompile pool (bench/proof_plan.py)
        report["precompile"] = json.loads((out / "precompile.json").read_text())
    log = out / "gpu_proof.log"
    _write_report(out, report)
    if not time_plan["fits"]:
        print(f"[gpu_proof] the time plan does not fit: {time_plan['spare_s']:.0f} s spare of {time_plan['limit_s']} "
              "s, 60 needed (bench/proof_plan.py)", flush=True)
        if args.dry_run:
            return 2
    _install_reaper()
    wanted = [s for s in STAGES if s[0] in args.stages]
    for i, (name, nominal) in enumerate(wanted):
        left = deadline - time.monotonic()
        reserve = MIN_STAGE_S * (len(wanted) - i - 1)
        budget = args.stage_s or (nominal if nominal else left - 5)
        budget = max(5.0, min(budget, left - reserve))
        result = run_stage(name, budget, out, log, args.dry_run)
        report["stages"][name] = result
        _write_report(out, report)
        print(f"[gpu_proof] {name:<9} {result['status']:<10} {result['seconds']:6.1f} s  {result.get('summary', '')}",
              flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write_report(out, report)
    _plots(out, report)
    print(_summary(report), flush=True)
    return 0


#: the stage children running now (their process groups are killed when the run ends, however it ends)
_CHILDREN: set = set()


def _kill_children() -> None:
    for proc in list(_CHILDREN):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _CHILDREN.discard(proc)


def _install_reaper() -> None:
    """Stage children die with the run: at exit, and on SIGTERM / SIGINT / SIGHUP (a caller's timeout)."""
    import atexit

    atexit.register(_kill_children)

    def on_signal(signum, frame):
        _kill_children()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _die_with_parent() -> None:
    """preexec_fn of a stage child: SIGKILL when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _triton_cache_counts() -> tuple[int, int]:
    """(kernels, C launchers) in the Triton cache this run shares (TRITON_CACHE_DIR, else Triton's default): an entry
    holding a .cubin is a kernel build, one holding __triton_launcher a launcher build (triton 3.6 builds one per
    kernel signature on its first launch)."""
    path = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    kernels = launchers = 0
    try:
        for entry in path.iterdir():
            names = [p.name for p in entry.iterdir()] if entry.is_dir() else []
            kernels += any(n.endswith(".cubin") for n in names)
            launchers += any(n.startswith("__triton_launcher") for n in names)
    except OSError:
        pass
    return kernels, launchers


def run_stage(name: str, budget: float, out: Path, log: Path, dry_run: bool) -> dict:
    """Run one stage in a child process (its own session, killed as a group on timeout). Returns what the child
    recorded, with status ok / failed / timeout, seconds and the error."""
    part = Path(tempfile.mkstemp(prefix=f"proof-{name}-", suffix=".json")[1])
    part.unlink()
    cmd = [sys.executable, "-m", "bench.gpu_proof", str(out), "--child", name, "--part", str(part)]
    if dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if name == "parity":  # canary padding around every buffer a kernel writes, checked after each launch
        env["GEOALIGN_GUARD"] = "1"
    else:
        env.pop("GEOALIGN_GUARD", None)
    t0 = time.monotonic()
    cached = _triton_cache_counts()
    with open(log, "a") as f:
        f.write(f"\n===== stage {name} (budget {budget:.0f} s) {time.strftime('%H:%M:%S')}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        _CHILDREN.add(proc)
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own children too (pytest, a compile pool)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            _CHILDREN.discard(proc)
    result = json.loads(part.read_text()) if part.exists() else {}
    part.unlink(missing_ok=True)
    if status == "ok" and result.get("error"):
        status = "failed"
    kernels, launchers = _triton_cache_counts()
    result.update(status=status, seconds=round(time.monotonic() - t0, 1), budget_s=round(budget, 1),
                  triton_builds=kernels - cached[0], launcher_builds=launchers - cached[1])
    if status == "timeout":
        result["error"] = f"ran out of its {budget:.0f} s budget; what it finished is kept"
    elif status == "failed" and not result.get("error"):
        result["error"] = f"exit code {rc}: {_tail(log)}"
    return result


# -------------------------------------------------------------------------------------------------------- the child
class Stage:
    """What a stage child writes: ``record(key=value)`` merges into its part file at once (atomic), so a timeout
    keeps everything recorded before it."""

    def __init__(self, part: str, dry_run: bool):
        self.part, self.dry_run = part, dry_run
        self.data: dict = {}
        self.device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def record(self, **kw) -> None:
        from geoalign.atomic_files import write_text

        self.data.update(kw)
        write_text(self.part, json.dumps(self.data, indent=1, default=str))

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_child(name: str, out: str, part: str, dry_run: bool) -> int:
    stage = Stage(part, dry_run)
    faults = os.environ.get(FAULT_ENV, "").split(",")
    try:
        if f"{name}:fail" in faults:
            raise RuntimeError(f"fault injected by {FAULT_ENV}")
        if f"{name}:hang" in faults:
            stage.record(before_hang=True)
            time.sleep(3600)
        if not dry_run and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible (run with --dry-run on a CPU machine)")
        STAGE_FNS[name](stage, Path(out))
    except Exception as exc:  # recorded, and the parent goes on with the next stage
        traceback.print_exc()
        stage.record(error=f"{type(exc).__name__}: {exc}"[:2000])
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------- the stages
def stage_ceilings(st: Stage, out: Path) -> None:
    from .peak import measure_ceilings

    c = measure_ceilings(st.device, st.dtype, quick=st.dry_run)
    st.record(**c, summary=f"matmul {c['matmul_tflops']:.1f} TFLOP/s ({c['matmul_dtype']}), copy "
                           f"{c['copy_gbs']:.0f} GB/s")


def _random_fusion(cfg, dtype, device, seed):
    """A fusion with every parameter random (LayerNorm affine too, away from 1/0), so no gradient is trivially
    right."""
    from geoalign import GeoAlignFusion

    gen = torch.Generator().manual_seed(seed)
    fusion = GeoAlignFusion(cfg)
    with torch.no_grad():
        for p in fusion.parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for ln in fusion.layer_norms:
            ln.weight.add_(1.0)
    fusion.check_inputs = True
    return fusion.to(device=device, dtype=dtype)


def _parity_case(name, cfg, frames_or_L, st: Stage, backends) -> dict:
    """Every backend in the run's dtype against reference in fp32 on the same (rounded) values."""
    dev, dtype = st.device, st.dtype
    fusion = _random_fusion(cfg, dtype, dev, seed=7)
    ref_fusion = copy.deepcopy(fusion).float()
    gen = torch.Generator().manual_seed(8)
    gather_index, N = parity_gather_index(cfg, frames_or_L, dev, gen)
    L = gather_index.shape[0]
    q = (torch.randn(L, cfg.hidden_size, generator=gen)).to(dev, dtype)
    layers = [(torch.randn(N, cfg.geo_dim, generator=gen) * 1.5 + 0.7).to(dev, dtype)
              for _ in range(cfg.num_bank_layers)]
    grad = torch.randn(L, cfg.hidden_size, generator=gen).to(dev, dtype)

    def run(model, backend, cast, routes=None):
        """Forward + backward; ``routes`` forces the reference's Top-K indices (its softmax stays its own)."""
        from geoalign.backends import reference

        model.zero_grad(set_to_none=True)
        qq = q.to(cast).requires_grad_()
        original = reference.topk_lower_index
        if routes is not None:
            reference.topk_lower_index = lambda logits, k: routes
        try:
            out, routing = model(qq, [x.to(cast) for x in layers], gather_index, backend=backend,
                                 return_routing=True)
            out.backward(grad.to(cast))
        finally:
            reference.topk_lower_index = original
        tensors = {"q_hat": out.detach(), "dq": qq.grad}
        tensors.update({f"d_{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        return tensors, routing.topk_idx

    _, ref_idx = run(ref_fusion, "reference", torch.float32)
    result = {"L": L, "N": N, "M": cfg.num_bank_layers, "D": cfg.hidden_size, "D_geo": cfg.geo_dim,
              "H": cfg.projector_hidden, "dtype": str(dtype).replace("torch.", "")}
    for backend in backends:
        st.log(f"parity {name} {backend}")
        try:
            got, idx = run(fusion, backend, dtype)
            ref, _ = run(ref_fusion, "reference", torch.float32, routes=idx)  # the fp32 maths on the same routes
        except Exception as exc:
            traceback.print_exc()
            result[backend] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
            continue
        errs = {}
        for key, r in ref.items():
            g = got.get(key)
            if g is None:
                errs[key] = None
                continue
            g = g.float()
            errs[key] = float("nan") if not torch.isfinite(g).all() else \
                float((g - r).norm() / r.norm().clamp_min(1e-30))
        agree = float((idx == ref_idx).all(1).float().mean())
        worst = max((e for e in errs.values() if e is not None), default=float("nan"))
        passed = all(e is not None and e == e and e < PARITY_TOL for e in errs.values()) and agree >= TOPK_AGREEMENT
        result[backend] = {"passed": passed, "max_rel_err": worst, "topk_agreement": agree, "rel_err": errs}
    return result


def parity_gather_index(cfg, frames_or_L, device, gen):
    """(gather_index [L, G], N rows per layer) of a parity case: (frames,) = the real VGGT/Qwen alignment of that
    many frames; an int L = L tokens gathering random rows of L*G + 11."""
    from geoalign.geometry import build_gather_index

    from .shapes import VGGT_GRID

    if isinstance(frames_or_L, tuple):
        return build_gather_index(frames_or_L[0], VGGT_GRID).to(device), frames_or_L[0] * VGGT_GRID[0] * VGGT_GRID[1]
    N = frames_or_L * cfg.group_size + 11
    return torch.randint(0, N, (frames_or_L, cfg.group_size), generator=gen).to(device), N


def parity_small_config(dry_run: bool):
    """The parity stage's small odd-width fusion config."""
    from geoalign import GeoAlignConfig

    if dry_run:
        return GeoAlignConfig(hidden_size=40, geo_dim=37, bank_layers=(3, 5, 8), top_k=2, group_size=4,
                              projector_hidden=48, router_hidden=24)
    return GeoAlignConfig(hidden_size=200, geo_dim=136, bank_layers=(3, 5, 8, 9, 12, 17), top_k=2, group_size=4,
                          projector_hidden=264, router_hidden=72)


def stage_parity(st: Stage, out: Path) -> None:
    from geoalign.backends import SPARSE_BACKENDS, available_backends

    have = available_backends(st.device)
    backends = [b for b in SPARSE_BACKENDS if b in have]
    st.record(backends=backends, tolerance=PARITY_TOL, topk_agreement_min=TOPK_AGREEMENT,
              unavailable={b: _why_unavailable(b, st.device) for b in SPARSE_BACKENDS if b not in have})
    small = parity_small_config(st.dry_run)
    big = "dry_1_frame" if st.dry_run else "paper_32_frames"
    shape = DRY_SHAPE if st.dry_run else SHAPES["paper"]
    cases = {big: _parity_case(big, shape.config(), (1 if st.dry_run else 32,), st, backends)}  # the one that counts
    st.record(cases=cases)
    cases["small_odd"] = _parity_case("small_odd", small, 37 if st.dry_run else 301, st, backends)
    parity = {}
    for b in SPARSE_BACKENDS:
        if b not in backends:
            parity[b] = {"passed": None, "skipped": st.data["unavailable"].get(b, "not available")}
            continue
        per_case = {c: r[b] for c, r in cases.items()}
        parity[b] = {"passed": all(r.get("passed") for r in per_case.values()),
                     "max_rel_err": max(r.get("max_rel_err", float("nan")) for r in per_case.values()),
                     "cases": per_case}
    st.record(cases=cases, parity=parity,
              summary=", ".join(f"{b} {'passed' if r['passed'] else ('skipped' if r['passed'] is None else 'FAILED')}"
                                for b, r in parity.items()))


def _why_unavailable(backend: str, device) -> str:
    from geoalign.backends import REGISTRY

    if backend == "cuda":
        from geoalign_kernels.cuda.extension import extension_error

        return extension_error() or f"no CUDA device ({device})"
    return REGISTRY[backend].needs or f"{backend} is not available here"


def stage_fusion(st: Stage, out: Path) -> None:
    from geoalign.backends import ALL_BACKENDS, available_backends

    from .fusion_case import add_ratios, run_fusion_case
    from .shapes import shape_dict

    peak = _ceiling(out, "matmul_tflops")
    shape = DRY_SHAPE if st.dry_run else SHAPES["paper"]
    frames = 1 if st.dry_run else 32
    have = available_backends(st.device)
    backends = [b for b in ALL_BACKENDS if b in have]
    modes = ("fwdbwd", "infer") if st.dry_run else ("fwd", "bwd", "fwdbwd", "infer")
    budget = 0.01 if st.dry_run else 0.4
    rows: list = []
    st.record(shape=shape_dict(shape), frames=frames, backends=backends, peak_tflops=peak, rows=rows)
    errors = {}
    for backend in backends:  # one backend at a time, so a timeout keeps the rows already measured
        st.log(f"fusion {backend}")
        try:
            rows += run_fusion_case(shape, frames, [backend], st.dtype, st.device, budget, modes=modes,
                                    peak_tflops=peak)
        except Exception as exc:  # one backend's failure (a compile error, say) does not lose the others' rows
            traceback.print_exc()
            errors[backend] = f"{type(exc).__name__}: {exc}"[:1000]
        add_ratios(rows)
        st.record(rows=rows, backend_errors=errors)
    st.record(kernels=_kernel_profile(st, shape, frames, peak))
    fb = {r["backend"]: r for r in rows if r["mode"] == "fwdbwd" and "median_ms" in r}
    st.record(summary="fwdbwd vs reference: " + ", ".join(
        f"{b} {r.get('speedup_vs_reference', float('nan')):.2f}x" for b, r in fb.items() if b != "reference"))


def stage_compiled(st: Stage, out: Path) -> None:
    """compiled-reference's rows of the fusion table, with ratios against the fusion stage's reference rows."""
    from .fusion_case import add_ratios, run_fusion_case

    if st.device.type != "cuda":
        st.record(skipped="torch.compile of the reference is timed on CUDA only", summary="skipped (no CUDA)")
        return
    peak = _ceiling(out, "matmul_tflops")
    shape = SHAPES["paper"]
    try:
        fusion_rows = json.loads((out / "gpu_proof.json").read_text())["stages"]["fusion"]["rows"]
    except (OSError, KeyError, ValueError):
        fusion_rows = []
    reference = [r for r in fusion_rows if r.get("backend") == "reference"]
    rows = run_fusion_case(shape, 32, ["compiled-reference"], st.dtype, st.device, 0.4,
                           modes=("fwd", "bwd", "fwdbwd", "infer"), peak_tflops=peak)
    add_ratios(reference + rows)
    st.record(rows=rows, summary=", ".join(f"{r['mode']} {r.get('speedup_vs_reference', float('nan')):.2f}x"
                                           for r in rows if "median_ms" in r))


def _kernel_profile(st: Stage, shape, frames, peak) -> dict:
    """Device time per kernel of one triton fwd+bwd (after a warm-up), GEMM1 (_bank_gemm1_kernel) singled out."""
    if st.device.type != "cuda":
        return {"skipped": "kernel timing needs CUDA"}
    from torch.profiler import ProfilerActivity, profile

    from .fusion_case import make_case

    fusion, q, layers, gi = make_case(shape, frames, st.dtype, st.device)
    g = torch.randn_like(q)
    for _ in range(2):
        fusion(q, layers, gi, backend="triton").backward(g)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fusion(q, layers, gi, backend="triton").backward(g)
        torch.cuda.synchronize()
    per_kernel: dict = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.count:
            per_kernel[e.key] = {"us": float(t), "count": int(e.count)}
    total = sum(v["us"] for v in per_kernel.values())
    gemm1 = sum(v["us"] for k, v in per_kernel.items() if "_bank_gemm1_kernel" in k)
    L = q.shape[0]
    flops = 2 * L * shape.top_k * shape.group_size * shape.geo_dim * shape.projector_hidden
    top = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["us"])[:20])
    res = {"device_total_us": total, "gemm1_us": gemm1, "gemm1_flops": flops, "top_kernels": top}
    if gemm1:
        res["gemm1_tflops"] = flops / (gemm1 * 1e-6) / 1e12
        if peak:
            res["gemm1_pct_of_peak"] = 100.0 * res["gemm1_tflops"] / peak
    return res


def stage_encoder(st: Stage, out: Path) -> None:
    from geoalign.backends import available_backends

    from .encoder_case import run_encoder_case

    frames = 1 if st.dry_run else 32
    # (the dry run's aggregator is CPU-sized but its fusion widths are not tiny: torch there, Triton elsewhere)
    backend = "triton" if "triton" in available_backends(st.device) and not st.dry_run else "torch"
    rows: list = []
    for mode in ("infer", "fwdbwd"):
        st.log(f"encoder {mode}")
        rows += run_encoder_case(frames, backend, st.dtype, st.device, 0.05 if st.dry_run else 0.3, modes=(mode,))
        st.record(frames=frames, fusion_backend=backend, rows=rows)
    st.record(summary=", ".join(f"{r['backend']} {r['mode']} {r.get('median_ms', float('nan')):.0f} ms"
                                for r in rows))


def stage_training(st: Stage, out: Path) -> None:
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import build_inputs, random_frames, tiny_model
    from geoalign.training.config import TrainConfig
    from geoalign.training.synthetic import make_colour_dataset
    from geoalign.training.trainer import GeoAlignTrainer

    gpu = st.device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="proof-train-") as tmp:
        # image folders and image lists only: the GPU image has no PyAV to write or decode videos
        records = make_colour_dataset(tmp, 8, kinds=("folder", "images"), frame_counts=(1, 2, 2), height=8)
        cfg = TrainConfig(train_data=[records], media_root=tmp, output_dir=os.path.join(tmp, "run"),
                          precision="bf16" if gpu else "no", distributed="ddp", global_batch_size=2,
                          per_device_batch_size=1, learning_rate=3e-3, num_workers=0, logging_steps=0,
                          save_steps=0, progress_bar=False, num_frames=4, save_final_model=False, max_steps=2)
        model, tok = tiny_model(seed=0, backend="triton" if gpu else "torch")
        trainer = GeoAlignTrainer(cfg, model=model, processor=GeoAlignProcessor(tok, None, group_size=4,
                                                                                num_frames=4))
        res = trainer.train()
        m = trainer.accelerator.unwrap_model(trainer.model_ddp)
        losses = {str(k): float(v) for k, v in res.losses.items()}
        st.record(train={"losses": losses, "finite": all(v == v and abs(v) != float("inf") for v in losses.values()),
                         "device": str(next(m.fusion.parameters()).device),
                         "fusion_dtype": str(m.fusion.out_proj.weight.dtype),
                         "vggt_dtype": str(m.vggt.camera_token.dtype)})
    gen: dict = {}
    attns = ["sdpa"] + (["flash_attention_2"] if gpu and _imports("flash_attn") else [])
    for attn in attns:
        st.log(f"generate {attn}")
        m, tok = tiny_model(4, seed=0, backend="auto", attn_implementation=attn)
        m = m.to(st.device, torch.bfloat16 if gpu else torch.float32).eval()
        inputs = build_inputs(tok, [random_frames(2, 70, 84), random_frames(3, 56, 98, seed=1)], 4)
        inputs = {k: (v.to(st.device) if isinstance(v, torch.Tensor) else [x.to(st.device) for x in v])
                  for k, v in inputs.items()}
        with torch.no_grad():
            out_ids = m.generate(**inputs, max_new_tokens=4, do_sample=False)
            a = m(**inputs).logits.float()
            b = m(**inputs, fusion_backend="reference").logits.float()
        gen[attn] = {"generated_shape": list(out_ids.shape), "finite": bool(torch.isfinite(a).all()),
                     "logits_rel_err_auto_vs_reference_backend": float((a - b).norm() / b.norm())}
        st.record(generate=gen)
    if gpu and "flash_attention_2" not in gen:
        gen["flash_attention_2"] = {"skipped": "flash_attn does not import"}
    st.record(generate=gen, summary=f"train losses {list(losses.values())}, generate {sorted(gen)}")


def stage_tune(st: Stage, out: Path) -> None:
    from geoalign_kernels import configs

    from .fusion_case import make_case
    from .timing import time_fn

    if st.device.type != "cuda":
        st.record(skipped="autotune times kernels on CUDA only", summary="skipped (no CUDA)")
        return
    shape = SHAPES["paper"]
    fusion, q, layers, gi = make_case(shape, 32, st.dtype, st.device)
    g = torch.randn_like(q)

    def step(_=None):
        q.grad = None
        fusion.zero_grad(set_to_none=True)
        fusion(q, layers, gi, backend="triton").backward(g)

    step()
    default = time_fn(step, st.device, budget_s=0.5, min_reps=5)
    st.record(default_ms=default["median_ms"])
    configs.AUTOTUNE = True
    configs.TUNE_OUT = str(out / "tuned_configs.json")  # rewritten after every key: a timeout keeps what was timed
    step()  # the first call of each key times its candidates
    tuned = time_fn(step, st.device, budget_s=0.5, min_reps=5)
    choices = configs.tuned_configs()
    st.record(tuned_ms=tuned["median_ms"], speedup=default["median_ms"] / tuned["median_ms"], choices=choices,
              summary=f"triton fwdbwd {default['median_ms']:.2f} ms default -> {tuned['median_ms']:.2f} ms tuned")


def stage_pytest(st: Stage, out: Path) -> None:
    """pytest -m gpu, the Triton GPU tests first; every test's outcome goes to the log as it happens and into the
    record after each line, so a timeout keeps what ran."""
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider"]
    if st.dry_run:
        base.append("--collect-only")  # the GPU tests skip without a GPU: collecting them is the check here
    runs = [base + ["tests/test_triton_kernels.py"], base + ["tests", "--ignore", "tests/test_triton_kernels.py"]]
    outcomes: dict = {}
    summaries, worst = [], 0
    for cmd in runs:
        st.log(" ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)  # (dies with this stage child, however it dies)
        last = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
                if f" {word}" in line and "::" in line:
                    outcomes[line.split(" ")[0]] = word
                    st.record(outcomes=outcomes)
            if line.strip():
                last = line.strip()
        rc = proc.wait()
        summaries.append(last)
        if rc not in (0, 5):  # 5: nothing collected
            worst = rc
    counts = {w: sum(1 for v in outcomes.values() if v == w) for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    st.record(outcomes=outcomes, counts=counts, summary=" | ".join(summaries))
    if worst:
        raise RuntimeError(f"pytest -m gpu: {' | '.join(summaries)}")


STAGE_FNS = {"ceilings": stage_ceilings, "parity": stage_parity, "fusion": stage_fusion, "encoder": stage_encoder,
             "training": stage_training, "tune": stage_tune, "compiled": stage_compiled, "pytest": stage_pytest}


# ---------------------------------------------------------------------------------------------------------- helpers
def _imports(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def _ceiling(out: Path, key: str):
    try:
        return json.loads((out / "gpu_proof.json").read_text())["stages"]["ceilings"].get(key)
    except Exception:
        return None


def _environment() -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,  # not backend names
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for mod in ("triton", "transformers", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def _write_report(out: Path, report: dict) -> None:
    from geoalign.atomic_files import write_text

    write_text(out / "gpu_proof.json", json.dumps(report, indent=1, default=str))


def _tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text()[-n:]
    except OSError:
        return ""


def _plots(out: Path, report: dict) -> None:
    from .report import write_plots

    title = f"{report['environment']['device']} | gpu_proof"
    for stage in ("fusion", "encoder"):
        rows = list(report["stages"].get(stage, {}).get("rows") or [])
        if stage == "fusion":
            rows += report["stages"].get("compiled", {}).get("rows") or []
        if rows:
            write_plots(str(out / f"{stage}.png"), rows, f"{stage} | {title}")


def _summary(report: dict) -> str:
    lines = [f"gpu_proof on {report['environment']['device']}"]
    for name, r in report["stages"].items():
        lines.append(f"  {name:<9} {r['status']:<8} {r.get('summary', '') or r.get('error', '')}"[:300])
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
