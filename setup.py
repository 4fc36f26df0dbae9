"""geoalign: performance-engineered PyTorch + Triton package for GeoAlign.

Installs three import packages:
  geoalign          the model, the fusion module and its backends (from ./geoalign)
  geoalign_kernels  the Triton kernels (from ./kernels; not named `kernels`, which
                    would shadow Hugging Face's `kernels` package that transformers probes)
  geoalign_bench    the benchmark suite (from ./bench; `python -m bench` from the repo root also works)
"""
from setuptools import find_packages, setup

setup(
    name="geoalign",
    version="0.1.0",
    description="GeoAlign: Top-K routed multi-layer geometry fusion for MLLMs, with exact sparse streaming kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["geoalign", "geoalign.*"]) + ["geoalign_kernels", "geoalign_bench"],
    package_dir={
        "geoalign": "geoalign",
        "geoalign_kernels": "kernels",
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
        "dev": ["pytest", "pytest-benchmark", "triton>=3.6", "matplotlib", "pycocoevalcap", "pyarrow"],
        "plots": ["matplotlib"],
    },
    package_data={"geoalign.geometry": ["*.json"]},
    entry_points={"console_scripts": ["geoalign=geoalign.cli:main"]},
)
