"""Let PyPI's torchvision import beside a CPU build of torch (for vLLM on a machine without the PyTorch CPU index).

On x86_64, PyPI's torchvision wheel is the CUDA build: beside ``torch==2.13.0+cpu`` its C extension cannot load
(``libc10_cuda.so`` is missing), and torchvision's ``_meta_registrations`` then fails at import with
``RuntimeError: operator torchvision::nms does not exist``. transformers' image utilities import torchvision, and
``from vllm import LLM`` imports those, so vLLM cannot start. The clean fix is the CPU torchvision from the PyTorch
index (``pip install torchvision --index-url https://download.pytorch.org/whl/cpu``). Where that index is out of
reach (our CI machine sees only PyPI), this module defines the two operator schemas torchvision registers fakes for
without checking (``nms`` and ``qnms``), *only* when torchvision's extension failed to load, before
``torchvision._meta_registrations`` runs. Calling either op then raises (no kernel); nothing in vLLM's or our
Qwen2.5-VL path calls them (transformers uses torchvision's Python transforms only).

    python -m geoalign.vllm.torchvision_cpu --install   # writes geoalign_torchvision_cpu.pth into site-packages
    python -m geoalign.vllm.torchvision_cpu --check     # does torchvision import without the hook? (else: why not)

GEOALIGN_TORCHVISION_HOOK=0 turns an installed hook off.

The ``.pth`` line installs an import hook (no import of torch at start-up): vLLM's spawned workers get it too.
"""
from __future__ import annotations

import sys

PTH_NAME = "geoalign_torchvision_cpu.pth"
#: the .pth line (site runs lines that start with "import"); it does nothing once geoalign is uninstalled
PTH_LINE = ("import importlib.util as _u; _u.find_spec('geoalign') and "
            "__import__('geoalign.vllm._torchvision_hook', fromlist=['install_hook']).install_hook()\n")


def _site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def main(argv=None) -> int:
    import argparse
    import os
    import subprocess

    p = argparse.ArgumentParser(prog="python -m geoalign.vllm.torchvision_cpu", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--install", action="store_true", help=f"write {PTH_NAME} into this environment's site-packages")
    g.add_argument("--uninstall", action="store_true", help=f"remove {PTH_NAME}")
    g.add_argument("--check", action="store_true", help="does torchvision import here (without the hook)?")
    a = p.parse_args(argv)
    pth = os.path.join(_site_packages(), PTH_NAME)
    if a.install:
        from ..atomic_files import write_text

        write_text(pth, PTH_LINE)
        print(f"wrote {pth}")
    elif a.uninstall:
        if os.path.exists(pth):
            os.remove(pth)
            print(f"removed {pth}")
        else:
            print(f"{pth} is not there")
    else:
        r = subprocess.run([sys.executable, "-c", "import torchvision; print('torchvision', torchvision.__version__, "
                            "'imports; its C ops load:', torchvision.extension._has_ops())"],
                           capture_output=True, text=True, env=dict(os.environ, GEOALIGN_TORCHVISION_HOOK="0"))
        print(r.stdout.strip() or r.stderr.strip().splitlines()[-1])
        return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
