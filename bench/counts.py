"""Deterministic counts of the fusion op, per backend: matmul FLOPs, kernel launches and host syncs of one forward
and one backward (no timing, so no noise; runs anywhere, Triton under the interpreter on CPU).

    python -m bench.counts [--shape cpu] [--frames 1] [--backends reference torch triton] [--out FILE.json]

  matmul FLOPs   torch.utils.flop_counter.FlopCounterMode over the aten matmuls (the Triton kernels are custom ops
                 it does not see, so only reference/torch get a measured figure); next to it the sparse formula of
                 docs/architecture.md (section 2) for forward, and for backward with no dx GEMM in the bank.
  (Under the Triton interpreter the triton backend is counted at the `tiny` widths: counts do not depend on
  widths, and interpreted GEMMs at real widths take hours.)
  launches       aten ops that run a kernel (views, allocations and metadata ops excluded; each op counted as one
                 launch) plus every Triton kernel launch, inside the custom ops too (the Triton interpreter's own
                 copies of a kernel's arguments to and from host buffers are not counted: no GPU runs them).
  host syncs     ops that make the host wait for the device on CUDA: .item()/int()/bool() of a tensor
                 (_local_scalar_dense), .tolist(), nonzero, bincount, unique, masked_select, repeat_interleave
                 without output_size.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from geoalign.backends import ALL_BACKENDS

from .fusion_case import make_case
from .shapes import SHAPES, FusionShape
from .report import environment, write_json

aten = torch.ops.aten
NO_KERNEL = {  # allocations and metadata: no kernel runs (views are recognised by OpOverload.is_view)
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.empty_like.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default, aten.set_.source_Storage,
    aten.set_.source_Storage_storage_offset, aten.resize_.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_same_size.default,
}
SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
        aten.repeat_interleave.Tensor, aten.unique_dim.default, aten._unique2.default, aten.unique_consecutive.default}


class KernelCounter(TorchDispatchMode):
    """Counts aten kernels, Triton launches and host syncs while active (custom ops are entered, so the kernels
    their launchers run are counted too). ``launches`` = aten kernels + Triton launches."""

    def __init__(self):
        super().__init__()
        self.aten_kernels = 0
        self.triton_launches = 0
        self.host_syncs = 0
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self._patched: list = []
        self._depth = 0
        self._in_launch = False

    @property
    def launches(self) -> int:
        return self.aten_kernels + self.triton_launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__) if func.namespace == "aten" else f"{func.namespace}::{func}"
        if func.namespace != "aten":  # a custom op: run its Python implementation under this mode, so the aten
            opdef = _maybe_get_opdef(func)  # kernels and Triton launches inside it are counted
            if opdef is None:
                raise RuntimeError(f"bench.counts: cannot look inside the custom op {name}")
            with self:
                return opdef._init_fn(*args, **kwargs)
        if self._in_launch:  # the Triton interpreter copying a kernel's arguments (CPU only)
            return func(*args, **kwargs)
        if func in SYNC or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.host_syncs += 1
            self.syncs[name] += 1
        if not (func.is_view or func in NO_KERNEL):
            self.aten_kernels += 1
            self.ops[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        if self._depth == 0:  # re-entered inside custom ops: patch once
            self._patch_triton()
            self._patch_tolist()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            for owner, attr, original in reversed(self._patched):
                setattr(owner, attr, original)
            self._patched = []
        return out

    def _patch(self, owner, attr, wrapper_factory):
        original = getattr(owner, attr)
        self._patched.append((owner, attr, original))
        setattr(owner, attr, wrapper_factory(original))

    def _patch_triton(self):
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        owners = [JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            owners.append(InterpretedFunction)
        except ImportError:
            pass
        counter = self

        def factory(original):
            def run(self_fn, *args, **kwargs):
                if counter._in_launch:  # JITFunction.run inside InterpretedFunction.run: one launch
                    return original(self_fn, *args, **kwargs)
                if not kwargs.get("warmup", False):
                    counter.triton_launches += 1
                    counter.ops[f"triton::{getattr(self_fn, '__name__', getattr(self_fn, 'fn', self_fn))}"] += 1
                counter._in_launch = True  # the interpreter's own host copies of the arguments are not kernels
                try:
                    return original(self_fn, *args, **kwargs)
                finally:
                    counter._in_launch = False
            return run
        for owner in owners:
            self._patch(owner, "run", factory)

    def _patch_tolist(self):
        counter = self

        def factory(original):
            def tolist(t):
                counter.host_syncs += 1
                counter.syncs["tolist"] += 1
                return original(t)
            return tolist
        self._patch(torch.Tensor, "tolist", factory)


def formula_flops(shape: FusionShape, L: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one forward and one backward of the exact sparse path, q requiring a
    gradient: the bank's backward is the one GEMM M = dz^T x_hat (no dx = dz W1: VGGT is frozen); W2, W_out and the
    router fc1 need dX and dW; the router fc2 needs dX and dW too."""
    c = shape
    bank = L * c.top_k * c.group_size * c.geo_dim * c.projector_hidden
    out = L * (c.projector_hidden * c.hidden_size + c.hidden_size * c.hidden_size)
    router = L * (c.hidden_size * c.router_hidden + c.router_hidden * c.num_layers)
    fwd = 2 * (bank + out + router)
    bwd = 2 * (bank + 2 * out + 2 * router)
    return {"forward": fwd, "backward": bwd, "backward_over_forward": bwd / fwd}


def count_backend(shape: FusionShape, frames: int, backend: str, dtype: torch.dtype, device: torch.device) -> dict:
    """One forward and one backward of the fusion (q and every parameter need a gradient), counted. Input value
    checks are off (fusion.check_inputs = False), as in a CUDA graph; guard mode must be off too."""
    from geoalign_kernels import guard

    if guard.ENABLED:
        raise RuntimeError("bench.counts: GEOALIGN_GUARD=1 adds a sync per launch; unset it")
    fusion, q, layers, gather_index = make_case(shape, frames, dtype, device)
    grad_out = torch.randn_like(q)
    fusion(q, layers, gather_index, backend=backend).backward(grad_out)  # warm-up: compile / caches
    q.grad = None
    fusion.zero_grad(set_to_none=True)
    row: dict = {"backend": backend, "shape": shape.name, "L": q.shape[0]}
    with FlopCounterMode(display=False) as flops_fwd, KernelCounter() as fwd:
        y = fusion(q, layers, gather_index, backend=backend)
    with FlopCounterMode(display=False) as flops_bwd, KernelCounter() as bwd:
        y.backward(grad_out)
    for name, counter, flops in (("forward", fwd, flops_fwd), ("backward", bwd, flops_bwd)):
        row[name] = {"launches": counter.launches, "aten_kernels": counter.aten_kernels,
                     "triton_launches": counter.triton_launches, "host_syncs": counter.host_syncs,
                     "syncs": dict(counter.syncs), "ops": dict(sorted(counter.ops.items())),
                     "matmul_flops_measured": flops.get_total_flops() if backend != "triton" else None}
    row["launches_per_step"] = fwd.launches + bwd.launches
    if backend != "triton":
        row["backward_over_forward_matmul_flops"] = (row["backward"]["matmul_flops_measured"]
                                                     / row["forward"]["matmul_flops_measured"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", nargs="+", choices=ALL_BACKENDS,
                   default=[b for b in ALL_BACKENDS if b != "cuda"])  # the cuda backend's kernels need a GPU
    p.add_argument("--out", default=None, help="write the counts as JSON here")
    args = p.parse_args(argv)
    shape, dtype, device = SHAPES[args.shape], getattr(torch, args.dtype), torch.device(args.device)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    rows = [count_backend(SHAPES["tiny"] if b == "triton" and interpreted else shape, args.frames, b, dtype, device)
            for b in args.backends]
    L = rows[0]["L"]
    payload = {"shape": args.shape, "frames": args.frames, "dtype": args.dtype, "L": L,
               "formula_matmul_flops": formula_flops(shape, L),
               "formula_matmul_flops_paper": formula_flops(SHAPES["paper"], L),
               "environment": environment(device), "backends": rows}
    for r in rows:
        ratio = r.get("backward_over_forward_matmul_flops")
        print(f"{r['backend']:>10}: launches fwd {r['forward']['launches']:4d} bwd {r['backward']['launches']:4d} "
              f"(step {r['launches_per_step']}), host syncs fwd {r['forward']['host_syncs']} bwd "
              f"{r['backward']['host_syncs']}" + (f", bwd/fwd matmul FLOPs {ratio:.3f}" if ratio else ""))
    f = payload["formula_matmul_flops_paper"]
    print(f"formula at paper widths: bwd/fwd matmul FLOPs {f['backward_over_forward']:.3f}")
    if args.out:
        write_json(args.out, payload)
    else:
        print(json.dumps({k: v for k, v in payload.items() if k != "environment"}, indent=1)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
