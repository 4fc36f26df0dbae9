"""geoalign: performance-engineered PyTorch + Triton package for GeoAlign.

Installs three import packages:
  geoalign          the model, the fusion module and its backends (from ./geoalign)
  geoalign_kernels  the Triton kernels (from ./kernels/geoalign_kernels). ./kernels itself has no __init__.py:
                    a script or `python -m` run from the repository root puts the root on sys.path, and an
                    importable ./kernels would be picked up (and executed a second time, re-registering our
                    torch.library ops) by transformers' probe for Hugging Face's `kernels` package
  geoalign_bench    the benchmark suite (from ./bench; `python -m bench` from the repo root also works)
"""
import os

from setuptools import find_packages, setup

# Optional CUDA extension (csrc/): built when a CUDA build of torch and a CUDA toolkit are present at build time
# (e.g. `TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .`); otherwise skipped, and
# geoalign.backends.cuda_backend JIT-builds it on first use (or the torch/triton backends are used).
ext_modules, cmdclass = [], {}
if os.environ.get("GEOALIGN_BUILD_CUDA", "1") != "0":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

        if torch.version.cuda is not None and CUDA_HOME is not None:
            ext_modules.append(CUDAExtension(
                name="geoalign._cuda_ops",
                sources=["csrc/binding.cpp", "csrc/routing.cu", "csrc/gather_ln.cu"],
                include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            ))
            cmdclass["build_ext"] = BuildExtension
    except ImportError:
        pass

setup(
    name="geoalign",
    version="0.1.0",
    description="GeoAlign: Top-K routed multi-layer geometry fusion for MLLMs, with exact sparse streaming kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["geoalign", "geoalign.*"]) + ["geoalign_kernels", "geoalign_bench"],
    package_dir={
        "geoalign": "geoalign",
        "geoalign_kernels": "kernels/geoalign_kernels",
        "geoalign_bench": "bench",
    },
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors",
        "transformers>=5.17",
        "pillow",
        "av",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "eval": ["pycocoevalcap", "pyarrow"],
        "train": ["accelerate>=1.0", "peft", "tensorboard"],
        "deepspeed": ["deepspeed"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "matplotlib", "pycocoevalcap", "pyarrow",
                "accelerate>=1.0", "peft", "tensorboard", "deepspeed"],
        "plots": ["matplotlib"],
    },
    package_data={"geoalign.geometry": ["*.json"], "geoalign.training": ["*.json"]},
    entry_points={"console_scripts": ["geoalign=geoalign.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
