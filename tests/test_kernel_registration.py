"""Regression tests for the `ValueError: vector::reserve` / segfault that hit about one test run in six.

Cause (README "Reliability"): the repository's top-level `kernels/` folder was importable as a package named
`kernels`. Building a Qwen model imports transformers.activations, whose probe for Hugging Face's `kernels` package
imported it (a second copy of our kernel modules), which re-registered every `geoalign::triton_*` op; torch then
freed the first registration, and the op objects still held by `geoalign_kernels` read freed memory.
Two fixes, each tested on its own here:
  1. layout: the sources live in kernels/geoalign_kernels/, and kernels/ has no __init__.py, so `kernels` is at most
     an empty namespace package that transformers reports as "not installed";
  2. idempotent registration (geoalign_kernels.library.custom_op): a second import of the same source reuses the
     registered op instead of replacing it.
Each check runs in a fresh interpreter with glibc's tcache off and freed memory perturbed, the setting in which the
old code crashed 5 runs in 6 (3 in 3 for the direct reproduction).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]

# Calls every geoalign::triton_* op once with tiny valid inputs; fails if an op is registered without a call here.
CALL_EVERY_OP = textwrap.dedent('''
    import torch
    import geoalign_kernels.bank as bank, geoalign_kernels.output as output, geoalign_kernels.routing as routing
    from geoalign_kernels.library import REGISTERED

    L, G, Dg, H, K, M, R, D = 5, 2, 8, 16, 2, 3, 4, 6
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    layer, gi = r(20, Dg), torch.randint(0, 20, (L, G), generator=g)
    alpha, tokens, slots = torch.rand(L, K, generator=g), torch.arange(L), torch.zeros(L, dtype=torch.long)
    offsets = torch.tensor([0, L])
    lw, lb, w1, b1 = 1 + r(Dg), r(Dg), r(H, G * Dg), r(H)
    affine = torch.stack([lw, lb])[:, None]  # [2, 1, Dg]
    calls = {
        "geoalign::triton_bank_rows": lambda: bank.bank_rows_op(torch.zeros(L, 1, dtype=torch.long), 1),
        "geoalign::triton_bank_layer_forward": lambda: bank.bank_layer_forward_op(
            torch.zeros(L, H), alpha, lw, lb, w1, b1, layer, tokens, slots, offsets, 0, gi, 1e-5,
            torch.empty(L, G * Dg), torch.empty(L, G * Dg), torch.empty(2, 1, Dg), True),
        "geoalign::triton_bank_tape_forward": lambda: bank.bank_tape_forward_op(
            torch.zeros(L, H), alpha[:, :1], w1, b1, torch.arange(L), r(L, G * Dg), torch.empty(L, H)),
        "geoalign::triton_bank_backward": lambda: bank.bank_backward_op(
            r(L, H), alpha, affine, w1, tokens, slots, offsets, r(L, G * Dg), r(L, H), True, True),
        "geoalign::triton_route": lambda: routing.route_op(r(L, R), r(M, R), r(M), K),
        "geoalign::triton_route_backward": lambda: routing.route_backward_op(
            r(L, K), torch.softmax(r(L, K), -1), torch.zeros(L, K, dtype=torch.int32), r(L, R), r(M, R)),
        "geoalign::triton_output": lambda: output.output_op(r(L, D), r(L, H), r(D, H), r(D), r(D, D)),
        "geoalign::triton_output_backward": lambda: output.output_backward_op(
            r(L, D), None, r(L, H), r(L, D), r(D, H), r(D, D)),
        "geoalign::triton_output_folded": lambda: output.output_folded_op(r(L, D), r(L, H), r(D, H), r(D)),
    }
    registered = {name for name in REGISTERED if name.startswith("geoalign::triton_")}
    assert registered == set(calls), f"ops without a call here: {registered ^ set(calls)}"
    for _ in range(3):
        for name, call in calls.items():
            call()
    print("every op callable:", len(calls))
''')


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", MALLOC_PERTURB_="165",
               GLIBC_TUNABLES="glibc.malloc.tcache_count=0", PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/ must stay a plain folder: an importable top-level `kernels` is what transformers' probe imported")
    assert (ROOT / "kernels" / "geoalign_kernels" / "__init__.py").exists()


def test_transformers_probe_from_the_repository_root_leaves_every_op_callable():
    """The crash's own path: repository root on sys.path, geoalign_kernels imported, then transformers'
    activations (its probe for Hugging Face's `kernels` package), then every op. Whatever `kernels` the probe finds
    (none, or Hugging Face's own, which newer transformers install) must not be this repository's folder: at most
    an empty namespace package with no code of ours run."""
    code = textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import geoalign_kernels.bank, geoalign_kernels.output, geoalign_kernels.routing
        import transformers.activations
        from transformers.utils import import_utils
        ours = os.path.realpath({str(ROOT / "kernels")!r})
        mod = sys.modules.get("kernels")
        if mod is not None:
            where = [getattr(mod, "__file__", None) or ""] + list(getattr(mod, "__path__", []))
            inside = [w for w in where if w and os.path.realpath(w).startswith(ours)]
            assert not inside or getattr(mod, "__file__", None) is None, f"ran the repository's kernels/: {{mod}}"
            ran = sorted(n for n in sys.modules if n.startswith("kernels."))
            assert not (inside and ran), f"imported modules from the repository's kernels/: {{ran}}"
        print("kernels module:", getattr(mod, "__file__", None) if mod is not None else None)
    ''') + CALL_EVERY_OP
    proc = run_fresh(code)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "every op callable" in proc.stdout


def test_second_import_of_the_kernel_sources_reuses_the_ops(tmp_path):
    """The kernel sources imported a second time under another package name (what the old layout allowed):
    registration is idempotent, so the first import's op objects stay valid and are the very same objects."""
    alias = tmp_path / "alias_kernels"
    alias.symlink_to(ROOT / "kernels" / "geoalign_kernels", target_is_directory=True)
    code = textwrap.dedent(f'''
        import sys
        import geoalign_kernels.bank, geoalign_kernels.output, geoalign_kernels.routing
        sys.path.insert(0, {str(tmp_path)!r})
        import alias_kernels.bank, alias_kernels.output, alias_kernels.routing
    ''') + CALL_EVERY_OP + textwrap.dedent('''
        assert alias_kernels.bank.bank_layer_forward_op is geoalign_kernels.bank.bank_layer_forward_op
        assert alias_kernels.routing.route_op is geoalign_kernels.routing.route_op
        assert alias_kernels.output.output_op is geoalign_kernels.output.output_op
    ''')
    proc = run_fresh(code)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "every op callable" in proc.stdout
