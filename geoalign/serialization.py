"""Saved forms of GeoAlign besides the transformers checkpoint: the fusion alone, and the legacy model directory.

Fusion-only directory (``save_fusion`` / ``load_fusion``): ``geoalign_config.json`` + ``fusion.safetensors`` with
the fusion's own parameter names (layer_norms.{i}.*, projector.*, router.*, out_proj.weight, ...). Small, separate
from the base weights; written atomically.

Legacy model directory (what geoalign wrote before the model became a transformers PreTrainedModel):
``geoalign_model.json`` (the manifest), ``qwen/`` (Qwen's own save_pretrained), ``vggt/`` (``model.safetensors``
with official ``aggregator.*`` names + ``vggt_config.json``) and the fusion files at the top.
``GeoAlignForConditionalGeneration.from_pretrained`` still loads it; ``geoalign convert OLD NEW`` (or
``geoalign.model_cli.convert_legacy_directory``) rewrites it as a transformers checkpoint.
"""
from __future__ import annotations

import json
import os

import torch

from .atomic_files import save_safetensors, staged_directory
from .config import GeoAlignConfig
from .fusion import GeoAlignFusion

FUSION_CONFIG = "geoalign_config.json"
FUSION_WEIGHTS = "fusion.safetensors"
LEGACY_MANIFEST = "geoalign_model.json"
LEGACY_QWEN_SUBDIR = "qwen"
LEGACY_VGGT_SUBDIR = "vggt"
VGGT_CONFIG = "vggt_config.json"


def write_fusion_files(fusion: GeoAlignFusion, directory: str) -> None:
    """geoalign_config.json + fusion.safetensors into ``directory`` (inside a staged directory)."""
    fusion.config.save_pretrained(directory)
    sd = {k: v.detach().contiguous().cpu() for k, v in fusion.state_dict().items()}
    save_safetensors(os.path.join(directory, FUSION_WEIGHTS), sd, metadata={"format": "pt", "geoalign": "fusion"})


def save_fusion(fusion: GeoAlignFusion, directory: str | os.PathLike) -> None:
    """The fusion alone, as one directory written atomically: ``geoalign_config.json`` + ``fusion.safetensors``."""
    with staged_directory(directory, FUSION_CONFIG) as stage:
        write_fusion_files(fusion, stage)


def load_fusion(directory: str | os.PathLike, *, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> GeoAlignFusion:
    """Load a fusion saved by :func:`save_fusion` (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"GeoAlign fusion directory not found: {d!r}")
    cfg_path = os.path.join(d, FUSION_CONFIG)
    w_path = os.path.join(d, FUSION_WEIGHTS)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"GeoAlign fusion config not found: {cfg_path!r}")
    if not os.path.isfile(w_path):
        raise FileNotFoundError(f"GeoAlign fusion weights not found: {w_path!r}")
    config = GeoAlignConfig.from_pretrained(d)
    fusion = GeoAlignFusion(config)
    try:
        sd = load_file(w_path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt or truncated file
        raise ValueError(f"cannot read fusion weights {w_path!r} (corrupt or half-written?): {e}") from e
    expected = {k: tuple(v.shape) for k, v in fusion.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}" for k in expected
           if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or bad:
        raise ValueError(f"fusion weights {w_path!r} do not match {cfg_path!r}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {bad}")
    fusion.load_state_dict(sd, strict=True)
    return fusion.to(device=device, dtype=dtype) if dtype is not None else fusion.to(device)


def is_legacy_directory(path: str | os.PathLike) -> bool:
    """True for a directory in the legacy layout (a geoalign_model.json manifest, no transformers config.json)."""
    p = os.fspath(path)
    return os.path.isfile(os.path.join(p, LEGACY_MANIFEST)) and not os.path.isfile(os.path.join(p, "config.json"))


def legacy_parts(path: str | os.PathLike) -> tuple[str, str, str]:
    """(Qwen directory, VGGT checkpoint directory, fusion directory) of a legacy model directory."""
    d = os.fspath(path)
    with open(os.path.join(d, LEGACY_MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != "geoalign":
        raise ValueError(f"{os.path.join(d, LEGACY_MANIFEST)!r} is not a GeoAlign model manifest")
    return (os.path.join(d, manifest.get("qwen", LEGACY_QWEN_SUBDIR)),
            os.path.join(d, manifest.get("vggt", LEGACY_VGGT_SUBDIR)), os.path.join(d, manifest.get("fusion", ".")))


def __getattr__(name: str):
    """Deprecated: ``convert_legacy_directory`` moved to geoalign.model_cli (it needs the model class, which sits
    above this module); this alias goes in the next release."""
    if name == "convert_legacy_directory":
        import warnings

        from .model_cli import convert_legacy_directory

        warnings.warn("geoalign.serialization.convert_legacy_directory moved to geoalign.model_cli",
                      DeprecationWarning, stacklevel=2)
        return convert_legacy_directory
    raise AttributeError(f"module 'geoalign.serialization' has no attribute {name!r}")
