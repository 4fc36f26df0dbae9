"""Building and loading GeoAlignForConditionalGeneration from files (local only): the base checkpoints (Qwen2.5-VL
+ VGGT + an optional fusion directory), a directory an earlier geoalign wrote (the legacy layout), and the checks a
saved model directory passes before transformers reads it. The model class is passed in (``cls``): this module sits
below geoalign.modeling and never imports it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from .atomic_files import staged_directory
from .config import GeoAlignConfig
from .fusion import GeoAlignFusion
from .geometry.aggregator import VGGTAggregator
from .geometry.config import VGGTAggregatorConfig
from .model_config import GeoAlignModelConfig, default_fusion_config
from .serialization import VGGT_CONFIG, is_legacy_directory, legacy_parts, load_fusion

logger = logging.getLogger("geoalign.modeling")


def mark_self_initialised(module: nn.Module) -> nn.Module:
    """Mark a module tree as initialised by its own constructor, so transformers' weight init leaves it alone. A
    module with non-persistent buffers stays unmarked: after a meta-device build transformers materialises those
    buffers empty, and the model's ``_init_weights`` must fill them (it leaves such a module's parameters alone; a
    flag on a parameter would also hide it from the missing keys of a checkpoint that lacks it)."""
    for m in module.modules():
        if not m._non_persistent_buffers_set:
            m._is_hf_initialized = True
    return module


def build_from_qwen_and_vggt(cls, qwen, vggt, fusion=None, *, vggt_config: VGGTAggregatorConfig | None = None,
                             geoalign_config: GeoAlignConfig | dict | None = None, dtype: torch.dtype | None = None,
                             device: torch.device | str | None = None, attn_implementation: str | None = None,
                             freeze_vision: bool = True):
    """``cls`` (GeoAlignForConditionalGeneration) built from the base checkpoints: see its from_qwen_and_vggt."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    qdir = os.fspath(qwen)
    if not os.path.isfile(os.path.join(qdir, "config.json")):
        raise FileNotFoundError(f"Qwen2.5-VL checkpoint directory not found or without config.json: {qdir!r} "
                                "(only local paths are supported)")
    vpath = os.fspath(vggt)
    if not os.path.exists(vpath):
        raise FileNotFoundError(f"VGGT checkpoint not found: {vpath!r}")
    kw: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(qdir, **kw)
    if vggt_config is None:
        cfg_file = os.path.join(vpath if os.path.isdir(vpath) else os.path.dirname(vpath), VGGT_CONFIG)
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                vggt_config = VGGTAggregatorConfig(**json.load(f))
    vggt_model = VGGTAggregator.from_pretrained(vpath, vggt_config, dtype=base.dtype)
    fusion_model = load_fusion(fusion) if fusion is not None else None
    fusion_config = fusion_model.config if fusion_model is not None else geoalign_config
    if isinstance(fusion_config, dict):      # overrides of the paper's defaults, e.g. {"fusion": "gated_2d3d"}
        fusion_config = GeoAlignConfig.from_dict(
            {**default_fusion_config(base.config, vggt_model.config).to_dict(), **fusion_config})
    config = GeoAlignModelConfig.from_parts(base.config, vggt_model.config, fusion_config,
                                            freeze_vision_tower=freeze_vision)
    with torch.device("meta"):
        model = cls(config)
    # take Qwen's tensors as they are (no copy), then the VGGT and fusion modules themselves
    state = base.state_dict()
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in base.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state_dict
        if name not in state:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module)._buffers[attr] = buf
    model.model.vggt = mark_self_initialised(vggt_model.requires_grad_(False))
    if fusion_model is None:
        fusion_model = GeoAlignFusion(config.fusion)
    model.model.fusion = mark_self_initialised(fusion_model.to(dtype=base.dtype))
    model.generation_config = base.generation_config
    model.tie_weights()
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{qdir!r} did not provide {leftover[:5]} (is it a Qwen2.5-VL checkpoint?)")
    return model.to(device) if device is not None else model


def legacy_sources(path, qwen=None, vggt=None, geoalign=None) -> tuple | None:
    """(Qwen dir, VGGT path, fusion dir) when ``path`` is a directory in the legacy layout (explicit qwen / vggt /
    geoalign arguments win), else None."""
    if not (os.path.isdir(os.fspath(path)) and is_legacy_directory(path)):
        return None
    logger.warning("%s is a legacy geoalign directory; convert it once with `geoalign convert %s NEW_DIR`", path, path)
    qwen_dir, vggt_dir, fusion_dir = legacy_parts(path)
    return qwen or qwen_dir, vggt or vggt_dir, geoalign or fusion_dir


def check_model_directory(path, kwargs: dict) -> None:
    """Before transformers reads a saved model: local files only (``local_files_only`` defaults to True in
    ``kwargs``; False lets transformers look on the hub), a GeoAlign config, safetensors files that open."""
    local_only = kwargs.setdefault("local_files_only", True)
    if local_only and not os.path.isdir(os.fspath(path)):
        raise FileNotFoundError(f"GeoAlign model directory not found: {os.fspath(path)!r} (only local files are "
                                "read; pass local_files_only=False to let transformers look on the hub)")
    if "subfolder" not in kwargs and "config" not in kwargs:   # else transformers finds the config itself
        _check_geoalign_directory(os.fspath(path))
    _check_weight_files(os.fspath(path))


def _check_weight_files(path: str) -> None:
    """Every safetensors file of a local model directory opens (its header parses and its data covers the file): a
    file cut short by a copy, or not a safetensors file, is one ValueError naming it."""
    if not os.path.isdir(path):
        return
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), framework="pt"):
                    pass
            except Exception as e:
                raise ValueError(f"model weights file {os.path.join(path, name)} is damaged or not a safetensors "
                                 f"file (cut short by a copy?): {e}") from None


def _check_geoalign_directory(path: str) -> None:
    """A local directory's config.json must be a GeoAlign model's (a plain Qwen2.5-VL checkpoint would load with a
    random VGGT and fusion)."""
    if not os.path.isdir(path):
        return                                   # a hub name (local_files_only=False): transformers reports
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{path!r} is not a GeoAlign model directory: it has no config.json (expected a "
                                "directory written by save_pretrained, `geoalign train` or `geoalign demo`)")
    try:
        with open(cfg) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{cfg!r} is not a readable JSON object: {e}") from None
    if model_type is None:
        raise ValueError(f"{cfg!r} has no model_type: it is not a transformers model config (a GeoAlign model's "
                         f"says {GeoAlignModelConfig.model_type!r})")
    if model_type != GeoAlignModelConfig.model_type:
        raise ValueError(f"{path!r} holds a {model_type!r} checkpoint, not a GeoAlign model (config.json model_type "
                         f"{GeoAlignModelConfig.model_type!r}): it has no VGGT encoder or fusion. Build one from it "
                         f"with `--qwen {path} --vggt VGGT_PATH` on the command line, or "
                         f"from_pretrained(qwen={path!r}, vggt=VGGT_PATH) in Python")


def base_checkpoint_kwargs(kwargs: dict) -> dict:
    """The from_pretrained keywords that from_qwen_and_vggt understands (device_map='cpu' is a device)."""
    out = {k: kwargs[k] for k in ("dtype", "attn_implementation", "vggt_config", "geoalign_config") if k in kwargs}
    if "torch_dtype" in kwargs and "dtype" not in out:
        out["dtype"] = kwargs["torch_dtype"]
    device = kwargs.get("device", kwargs.get("device_map"))
    if isinstance(device, (str, torch.device)) and device != "auto":
        out["device"] = device
    if "freeze_vision" in kwargs:
        out["freeze_vision"] = kwargs["freeze_vision"]
    return out


def device_as_map(kwargs: dict) -> dict:
    """from_pretrained's ``device=`` (one device) as transformers' ``device_map``."""
    device = kwargs.pop("device", None)
    if device is not None and kwargs.get("device_map") is None:
        kwargs["device_map"] = torch.device(device)
    return kwargs


def finish_loading(model, info: dict, path, geoalign) -> None:
    """After transformers loaded a saved model: its GeoAlign weights were all there (unless a fusion directory
    ``geoalign`` replaces them), the fusion directory is loaded."""
    missing = [k for k in info.get("missing_keys", ())
               if k.startswith(("model.fusion.", "model.vggt.", "fusion.", "vggt."))]  # full model / base model
    if missing and geoalign is None:
        raise ValueError(f"{os.fspath(path)!r} lacks GeoAlign weights {sorted(missing)[:4]} (of {len(missing)}): "
                         "a model saved without its fusion / VGGT encoder would run with random ones")
    if geoalign is not None:
        model.load_fusion(geoalign)


class GeoAlignLoadingMixin:
    """The construction and file methods of GeoAlignForConditionalGeneration (first in its bases, so ``super()`` here
    is Qwen2.5-VL's / transformers' own)."""

    @classmethod
    def from_parts(cls, qwen_config, vggt_config: VGGTAggregatorConfig | None = None,
                   geoalign_config: GeoAlignConfig | None = None, *, dtype: torch.dtype | None = None,
                   attn_implementation: str | None = None, freeze_vision: bool = True):
        """A randomly initialised model from Qwen2.5-VL's config and the VGGT and fusion configs (tests, ablations)."""
        config = GeoAlignModelConfig.from_parts(qwen_config, vggt_config, geoalign_config,
                                                freeze_vision_tower=freeze_vision)
        kw = {"attn_implementation": attn_implementation, "dtype": dtype}
        return cls._from_config(config, **{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_config(cls, config, vggt_config: VGGTAggregatorConfig | None = None,
                    geoalign_config: GeoAlignConfig | None = None, **kwargs):
        """A randomly initialised model: from a GeoAlignModelConfig, or as :meth:`from_parts` from Qwen's config and
        the VGGT and fusion configs."""
        if isinstance(config, GeoAlignModelConfig) and vggt_config is None and geoalign_config is None:
            kw = {k: kwargs[k] for k in ("dtype", "attn_implementation") if kwargs.get(k) is not None}
            return cls._from_config(config, **kw)
        return cls.from_parts(config, vggt_config, geoalign_config, **kwargs)

    @classmethod
    def from_qwen_and_vggt(cls, qwen: str | os.PathLike, vggt: str | os.PathLike,
                           fusion: str | os.PathLike | None = None,
                           *, vggt_config: VGGTAggregatorConfig | None = None,
                           geoalign_config: GeoAlignConfig | dict | None = None, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None, attn_implementation: str | None = None,
                           freeze_vision: bool = True):
        """Build from the base models (local files only): a Qwen2.5-VL directory, a VGGT checkpoint (file or
        directory; ``vggt_config.json`` beside it, else VGGT-1B) and a fusion directory written by
        :meth:`save_fusion` (else a fresh fusion from ``geoalign_config``: a GeoAlignConfig, or a dict of overrides of
        the paper's settings such as ``{"fusion": "gated_2d3d"}``; default: the paper's settings)."""
        return build_from_qwen_and_vggt(cls, qwen, vggt, fusion, vggt_config=vggt_config,
                                        geoalign_config=geoalign_config, dtype=dtype, device=device,
                                        attn_implementation=attn_implementation, freeze_vision=freeze_vision)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, qwen=None, vggt=None, geoalign=None,
                        **kwargs):
        """transformers' ``from_pretrained`` for a checkpoint written by :meth:`save_pretrained`.

        Also accepted: a legacy geoalign directory (``geoalign_model.json``; convert it once with
        ``geoalign convert OLD NEW``), and the base-model form ``from_pretrained(qwen=DIR, vggt=PATH,
        geoalign=FUSION_DIR)``, which is :meth:`from_qwen_and_vggt`."""
        path = pretrained_model_name_or_path
        if path is None and qwen is None and vggt is None and kwargs.get("config") is not None:
            path = "the given state_dict"  # transformers' from_pretrained(None, config=..., state_dict=...)
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(None, *args, output_loading_info=True, **device_as_map(kwargs))
            finish_loading(model, info, path, geoalign)
            return (model, info) if want_info else model
        if path is None or (qwen is not None and vggt is not None):
            if qwen is None or vggt is None:
                raise ValueError("from_pretrained needs a saved GeoAlign directory, or both qwen= and vggt= paths")
            return cls.from_qwen_and_vggt(qwen, vggt, geoalign, **base_checkpoint_kwargs(kwargs))
        legacy = legacy_sources(path, qwen, vggt, geoalign)
        if legacy is not None:
            return cls.from_qwen_and_vggt(*legacy, **base_checkpoint_kwargs(kwargs))
        check_model_directory(path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **device_as_map(kwargs))
        finish_loading(model, info, path, geoalign)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, processor=None, **kwargs):
        """transformers' ``save_pretrained``, written atomically (a staged directory renamed into place); with
        ``processor`` (a GeoAlignProcessor) its tokenizer and image processor go into the same directory."""
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)  # writes nothing on other ranks
        with staged_directory(save_directory, "config.json") as stage:
            super().save_pretrained(stage, *args, **kwargs)
            if processor is not None:
                processor.save_pretrained(stage)
