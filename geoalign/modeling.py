"""GeoAlignForConditionalGeneration: Qwen2.5-VL + frozen VGGT aggregator + GeoAlignFusion (pre-LLM injection).

The model *wraps* transformers' ``Qwen2_5_VLForConditionalGeneration`` (``model.qwen``), a frozen
:class:`geoalign.geometry.VGGTAggregator` (``model.vggt``) and a :class:`geoalign.GeoAlignFusion`
(``model.fusion``). The fusion is attached with a forward hook on Qwen's vision tower: the tower's merged output
(the 2x2 merger output, the router queries Q) is replaced by Q_hat before Qwen scatters it into the text embeddings.
Hooking the tower, rather than re-implementing Qwen's forward, keeps the model working across transformers versions
(Qwen handles its own placeholder masks, M-RoPE positions and KV cache).

Per sample b (samples are ordered sample-major, then image-major in Qwen's visual features):

* route Q_b with the fusion (``fusion.begin``), then run VGGT on that sample's frames with
  ``iter_layers(bank layers)`` and feed each bank layer to the stream as soon as it is produced; nothing holds all
  layers;
* Q_hat_b = ``stream.finish()``.

VGGT runs only when Qwen's vision tower runs, i.e. once at prefill in ``generate()``, never per decoded token.

Injection inside the LLM (``fusion.config.injection_layers``, paper Table 4 "Injection Position"): the vision tower's
output goes to the LLM unchanged; at prefill the tower hook runs VGGT once per sample and keeps the M bank layers.
A forward pre-hook on each chosen decoder layer ``qwen.model.language_model.layers[j]`` takes that layer's input
hidden states at the visual-token positions (``input_ids == image_token_id`` / ``video_token_id``) as the router
queries Q and replaces them by Q_hat (one fusion module shared by all chosen layers). In cached decoding steps the
hidden states have no visual positions (their length differs from the prompt's), and the hook does nothing. The
kept layers live until the next forward (so checkpointed decoder layers can recompute in backward); at inference
they are dropped when the call returns.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .atomic_files import save_safetensors, staged_directory, write_json
from .config import GeoAlignConfig
from .fusion import GeoAlignFusion
from .geometry.aggregator import VGGTAggregator
from .geometry.alignment import build_gather_index, check_grid_thw, qwen_grid_for_vggt
from .geometry.config import VGGTAggregatorConfig

MODEL_MANIFEST = "geoalign_model.json"
FUSION_CONFIG = "geoalign_config.json"
FUSION_WEIGHTS = "fusion.safetensors"
VGGT_CONFIG = "vggt_config.json"
VGGT_WEIGHTS = "model.safetensors"
QWEN_SUBDIR = "qwen"
VGGT_SUBDIR = "vggt"
FORMAT_VERSION = 1
PATCH_SIZE = 14


# ----------------------------------------------------------------------------------------------- fusion save / load
def _write_fusion_files(fusion: GeoAlignFusion, directory: str) -> None:
    """geoalign_config.json + fusion.safetensors into ``directory`` (inside a staged directory)."""
    fusion.config.save_pretrained(directory)
    sd = {k: v.detach().contiguous().cpu() for k, v in fusion.state_dict().items()}
    save_safetensors(os.path.join(directory, FUSION_WEIGHTS), sd, metadata={"format": "pt", "geoalign": "fusion"})


def save_fusion(fusion: GeoAlignFusion, directory: str | os.PathLike) -> None:
    """The fusion alone, as one directory written atomically: ``geoalign_config.json`` + ``fusion.safetensors``."""
    with staged_directory(directory, FUSION_CONFIG) as stage:
        _write_fusion_files(fusion, stage)


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


# ----------------------------------------------------------------------------------------------- geometry inputs
@dataclass
class _SampleGeometry:
    images: torch.Tensor                  # [S, 3, H, W] in [0, 1] for VGGT
    gather_index: torch.Tensor | None     # [L, G] or None (built from the grid)

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def vggt_grid(self) -> tuple[int, int]:
        return int(self.images.shape[-2]) // PATCH_SIZE, int(self.images.shape[-1]) // PATCH_SIZE


def _as_samples(vggt_pixel_values, gather_index) -> list[_SampleGeometry]:
    """Normalise VGGT inputs: a tensor [B, S, 3, H, W], a tensor [S, 3, H, W] (one sample) or a list of [S_b, 3,
    H_b, W_b] tensors; gather_index: None, a tensor [L, G] (one sample) or a list (None entries allowed)."""
    if isinstance(vggt_pixel_values, torch.Tensor):
        if vggt_pixel_values.dim() == 4:
            images = [vggt_pixel_values]
        elif vggt_pixel_values.dim() == 5:
            images = list(vggt_pixel_values.unbind(0))
        else:
            raise ValueError("vggt_pixel_values must be [B, S, 3, H, W], [S, 3, H, W] or a list of [S, 3, H, W] "
                             f"tensors, got shape {tuple(vggt_pixel_values.shape)}")
    elif isinstance(vggt_pixel_values, (list, tuple)):
        images = list(vggt_pixel_values)
    else:
        raise ValueError("vggt_pixel_values must be a tensor or a list of [S, 3, H, W] tensors, got "
                         f"{type(vggt_pixel_values).__name__}")
    if not images:
        raise ValueError("vggt_pixel_values is empty: expected one [S, 3, H, W] tensor per sample")
    for b, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 4 or im.shape[1] != 3:
            desc = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"vggt_pixel_values[{b}] must be a tensor [S, 3, H, W], got {desc}")
        if im.shape[-2] % PATCH_SIZE or im.shape[-1] % PATCH_SIZE:
            raise ValueError(f"vggt_pixel_values[{b}]: height and width must be multiples of {PATCH_SIZE}, "
                             f"got {tuple(im.shape[-2:])}")
    if gather_index is None:
        gis = [None] * len(images)
    elif isinstance(gather_index, torch.Tensor):
        if gather_index.dim() == 2:
            gis = [gather_index]
        elif gather_index.dim() == 3:
            gis = list(gather_index.unbind(0))
        else:
            raise ValueError(f"gather_index must be [L, G], [B, L, G] or a list, got {tuple(gather_index.shape)}")
    else:
        gis = list(gather_index)
    if len(gis) != len(images):
        raise ValueError(f"got VGGT frames for {len(images)} samples but gather_index for {len(gis)}")
    return [_SampleGeometry(im, gi) for im, gi in zip(images, gis)]


@dataclass
class _Pending:
    samples: list[_SampleGeometry]
    backend: str | None
    kind: str          # "image" or "video": the pixel input Qwen will encode
    used: bool = False
    visual_mask: torch.Tensor | None = None   # [B, T] bool, visual-token positions (in-LLM injection only)


@dataclass
class _Injection:
    """Geometry kept for in-LLM injection: per sample the M bank layers [N_b, D'] and gather_index [L_b, G]."""
    visual_mask: torch.Tensor                  # [B, T] bool; True rows are the visual tokens, sample-major
    samples: list[tuple[list[torch.Tensor], torch.Tensor]]
    backend: str | None

    @property
    def num_tokens(self) -> int:
        return sum(int(gi.shape[0]) for _, gi in self.samples)


def _visual_of(qwen: nn.Module) -> nn.Module:
    inner = getattr(qwen, "model", None)
    visual = getattr(inner, "visual", None) if inner is not None else None
    if visual is None:
        visual = getattr(qwen, "visual", None)
    if visual is None:
        raise TypeError(f"cannot find the vision tower of {type(qwen).__name__} (expected .model.visual or .visual)")
    return visual


def _decoder_layers(qwen: nn.Module) -> nn.ModuleList:
    """``qwen.model.language_model.layers`` (transformers 5.x Qwen2.5-VL), the decoder blocks the hooks go on."""
    lm = getattr(getattr(qwen, "model", None), "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(qwen).__name__} "
                        "(expected .model.language_model.layers)")
    return layers


def _check_local_dir(path: str | os.PathLike, what: str, must_have: Sequence[str] = ()) -> str:
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"{what} directory not found: {p!r} (only local paths are supported)")
    for name in must_have:
        if not os.path.isfile(os.path.join(p, name)):
            raise FileNotFoundError(f"{what}: missing file {os.path.join(p, name)!r}")
    return p


def _qwen_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


# ----------------------------------------------------------------------------------------------- the model
class GeoAlignForConditionalGeneration(nn.Module):
    """Qwen2.5-VL with GeoAlign's geometry fusion before the LLM.

    Build: ``GeoAlignForConditionalGeneration(qwen, vggt, fusion)``, :meth:`from_config` (random, for tests) or
    :meth:`from_pretrained` (local directories only).

    Call: ``model(input_ids=..., attention_mask=..., pixel_values=... | pixel_values_videos=..., image_grid_thw=... |
    video_grid_thw=..., vggt_pixel_values=..., gather_index=..., labels=...)`` and
    ``model.generate(**same, max_new_tokens=...)``. ``vggt_pixel_values`` holds each sample's frames for VGGT
    (a list of [S_b, 3, H_b, W_b] tensors in [0, 1], or one [B, S, 3, H, W] tensor); ``gather_index`` is optional
    (one [L_b, G] tensor per sample; default built from the frame grid as in design.md section 4).

    G (``fusion.config.group_size``) fixes the input path: 4 = frames as separate images (``pixel_values``),
    8 = Qwen's video path (``pixel_values_videos``, temporal patch 2).
    """

    def __init__(self, qwen: nn.Module, vggt: VGGTAggregator, fusion: GeoAlignFusion, *, freeze_vision: bool = True):
        super().__init__()
        cfg = fusion.config
        text_hidden = _text_hidden_size(qwen.config)
        vis_out = getattr(_vision_config(qwen.config), "out_hidden_size", text_hidden)
        if cfg.hidden_size != vis_out:
            raise ValueError(f"fusion hidden_size {cfg.hidden_size} != Qwen vision tower output width {vis_out}")
        if cfg.geo_dim != vggt.config.out_dim:
            raise ValueError(f"fusion geo_dim {cfg.geo_dim} != VGGT layer width {vggt.config.out_dim} "
                             "(2 * embed_dim)")
        if max(cfg.bank_layers) >= vggt.depth:
            raise ValueError(f"fusion bank_layers {list(cfg.bank_layers)} exceed VGGT's {vggt.depth} layers")
        if cfg.bank_selection != "explicit" and cfg.geo_depth != vggt.depth:
            raise ValueError(f"fusion bank_selection={cfg.bank_selection!r} was derived for geo_depth={cfg.geo_depth} "
                             f"layers, but this VGGT has {vggt.depth}; set geo_depth={vggt.depth}")
        if cfg.group_size not in (4, 8):
            raise ValueError(f"fusion group_size must be 4 (images) or 8 (video), got {cfg.group_size}")
        self.qwen = qwen
        self.vggt = vggt
        self.fusion = fusion
        vggt.requires_grad_(False)
        vggt.eval()
        self.freeze_vision = freeze_vision
        if freeze_vision:
            _visual_of(qwen).requires_grad_(False)
        p = next(qwen.parameters())
        fusion.to(device=p.device, dtype=p.dtype)
        #: number of times VGGT has been run (one per sample per vision-tower call); for tests and diagnostics
        self.vggt_calls = 0
        self._pending: _Pending | None = None
        self._bypass = False
        self._hook = _visual_of(qwen).register_forward_hook(self._visual_hook, with_kwargs=True)
        self._injection: _Injection | None = None
        self._decoder_hooks: list = []
        self._install_injection_hooks()

    def _install_injection_hooks(self) -> None:
        """(Re)register the forward pre-hooks on the decoder layers named by fusion.config.injection_layers."""
        for h in self._decoder_hooks:
            h.remove()
        self._decoder_hooks = []
        self._injection = None
        cfg = self.fusion.config
        if not cfg.injection_layers:
            return
        layers = _decoder_layers(self.qwen)
        bad = [j for j in cfg.injection_layers if j >= len(layers)]
        if bad:
            raise ValueError(f"fusion injection_layers {list(cfg.injection_layers)}: {bad} out of range for the "
                             f"LLM's {len(layers)} decoder layers")
        text_hidden = _text_hidden_size(self.qwen.config)
        if cfg.hidden_size != text_hidden:
            raise ValueError(f"in-LLM injection needs fusion hidden_size == the LLM width {text_hidden}, "
                             f"got {cfg.hidden_size}")
        for j in cfg.injection_layers:
            self._decoder_hooks.append(layers[j].register_forward_pre_hook(self._decoder_hook, with_kwargs=True))

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.qwen.config

    @property
    def geoalign_config(self) -> GeoAlignConfig:
        return self.fusion.config

    @property
    def group_size(self) -> int:
        return self.fusion.config.group_size

    @property
    def device(self) -> torch.device:
        return next(self.qwen.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.qwen.parameters()).dtype

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, qwen_config, vggt_config: VGGTAggregatorConfig | None = None,
                    geoalign_config: GeoAlignConfig | None = None, *, attn_implementation: str | None = None,
                    dtype: torch.dtype | None = None, freeze_vision: bool = True) -> "GeoAlignForConditionalGeneration":
        """A randomly initialised model (tests, training from scratch)."""
        kw: dict[str, Any] = {}
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        if dtype is not None:
            kw["dtype"] = dtype
        qwen = _qwen_class()._from_config(qwen_config, **kw)
        vggt = VGGTAggregator(vggt_config)
        if dtype is not None:
            vggt.to(dtype)
        fusion = GeoAlignFusion(geoalign_config or _default_fusion_config(qwen.config, vggt.config))
        return cls(qwen, vggt, fusion, freeze_vision=freeze_vision)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, qwen: str | os.PathLike | None = None,
                        vggt: str | os.PathLike | None = None, geoalign: str | os.PathLike | None = None,
                        vggt_config: VGGTAggregatorConfig | None = None,
                        geoalign_config: GeoAlignConfig | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, attn_implementation: str | None = None,
                        freeze_vision: bool = True) -> "GeoAlignForConditionalGeneration":
        """Load from local files only.

        * ``from_pretrained(dir)``: a directory written by :meth:`save_pretrained`.
        * ``from_pretrained(qwen=QWEN_DIR, vggt=VGGT_DIR_OR_FILE, geoalign=FUSION_DIR)``: the base checkpoints and
          (optionally) trained fusion weights saved by :meth:`save_fusion`; without ``geoalign`` a fresh fusion is
          built from ``geoalign_config`` (default: paper settings, D from Qwen, D' from VGGT).

        The VGGT config comes from ``vggt_config``, else ``vggt_config.json`` beside the checkpoint, else VGGT-1B.
        """
        if path is not None:
            d = _check_local_dir(path, "GeoAlign model", [MODEL_MANIFEST])
            with open(os.path.join(d, MODEL_MANIFEST)) as f:
                manifest = json.load(f)
            if manifest.get("format") != "geoalign":
                raise ValueError(f"{os.path.join(d, MODEL_MANIFEST)!r} is not a GeoAlign model manifest")
            qwen = qwen or os.path.join(d, manifest.get("qwen", QWEN_SUBDIR))
            vggt = vggt or os.path.join(d, manifest.get("vggt", VGGT_SUBDIR))
            geoalign = geoalign or os.path.join(d, manifest.get("fusion", "."))
        if qwen is None or vggt is None:
            raise ValueError("from_pretrained needs a saved GeoAlign directory, or both qwen= and vggt= paths")
        qdir = _check_local_dir(qwen, "Qwen2.5-VL checkpoint", ["config.json"])
        kw: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kw["dtype"] = dtype
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        qwen_model = _qwen_class().from_pretrained(qdir, **kw)
        if device is not None:
            qwen_model.to(device)
        vpath = os.fspath(vggt)
        if not os.path.exists(vpath):
            raise FileNotFoundError(f"VGGT checkpoint not found: {vpath!r}")
        if vggt_config is None:
            cfg_file = os.path.join(vpath if os.path.isdir(vpath) else os.path.dirname(vpath), VGGT_CONFIG)
            if os.path.isfile(cfg_file):
                with open(cfg_file) as f:
                    vggt_config = VGGTAggregatorConfig(**json.load(f))
        p = next(qwen_model.parameters())
        vggt_model = VGGTAggregator.from_pretrained(vpath, vggt_config, device=p.device, dtype=p.dtype)
        if geoalign is not None:
            fusion = load_fusion(geoalign, device=p.device, dtype=p.dtype)
        else:
            fusion = GeoAlignFusion(geoalign_config or _default_fusion_config(qwen_model.config, vggt_model.config))
        return cls(qwen_model, vggt_model, fusion, freeze_vision=freeze_vision)

    def save_pretrained(self, directory: str | os.PathLike, processor=None) -> None:
        """Write a self-describing directory: ``geoalign_model.json``, ``qwen/`` (Qwen's own save_pretrained,
        safetensors), ``vggt/`` (``model.safetensors`` with official ``aggregator.*`` names + ``vggt_config.json``),
        and the fusion (``geoalign_config.json`` + ``fusion.safetensors``). Loads back with ``from_pretrained(dir)``.
        With ``processor`` (a GeoAlignProcessor), its tokenizer and image processor go into ``qwen/`` too, so
        ``GeoAlignProcessor.from_pretrained(dir)`` and ``geoalign answer --model dir`` work."""
        with staged_directory(directory, MODEL_MANIFEST) as d:  # all or nothing: a crash leaves the old directory
            self.qwen.save_pretrained(os.path.join(d, QWEN_SUBDIR), safe_serialization=True)
            vdir = os.path.join(d, VGGT_SUBDIR)
            os.makedirs(vdir, exist_ok=True)
            sd = {"aggregator." + k: v.detach().contiguous().cpu() for k, v in self.vggt.state_dict().items()}
            save_safetensors(os.path.join(vdir, VGGT_WEIGHTS), sd, metadata={"format": "pt"})
            write_json(os.path.join(vdir, VGGT_CONFIG), self.vggt.config.to_dict())
            _write_fusion_files(self.fusion, d)
            if processor is not None:
                processor.save_pretrained(os.path.join(d, QWEN_SUBDIR))
            manifest = {"format": "geoalign", "format_version": FORMAT_VERSION, "qwen": QWEN_SUBDIR,
                        "vggt": VGGT_SUBDIR, "fusion": "."}
            write_json(os.path.join(d, MODEL_MANIFEST), manifest)

    def save_fusion(self, directory: str | os.PathLike) -> None:
        """Only the trained fusion: ``geoalign_config.json`` + ``fusion.safetensors`` (small, separate from the base)."""
        save_fusion(self.fusion, directory)

    def load_fusion(self, directory: str | os.PathLike) -> None:
        """Replace the fusion with one saved by :meth:`save_fusion` (same D and D' required)."""
        p = next(self.qwen.parameters())
        fusion = load_fusion(directory, device=p.device, dtype=p.dtype)
        if fusion.config.hidden_size != self.fusion.config.hidden_size or \
                fusion.config.geo_dim != self.fusion.config.geo_dim or \
                max(fusion.config.bank_layers) >= self.vggt.depth:
            raise ValueError(f"fusion in {os.fspath(directory)!r} ({fusion.config}) does not fit this model")
        self.fusion = fusion
        self._install_injection_hooks()

    # ------------------------------------------------------------------ geometry
    @contextlib.contextmanager
    def geometry(self, vggt_pixel_values, gather_index=None, *, pixel_values=None, pixel_values_videos=None,
                 backend: str | None = None, input_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Context in which Qwen's vision tower output is fused with these samples' VGGT geometry.
        ``input_ids`` [B, T] is needed for in-LLM injection (it marks the visual-token positions)."""
        self._injection = None  # geometry kept from the previous forward is released here
        if self._bypass or (pixel_values is None and pixel_values_videos is None):
            yield  # text only: nothing to fuse
            return
        if pixel_values is not None and pixel_values_videos is not None:
            raise ValueError("GeoAlign fuses one visual input kind per model: got both pixel_values and "
                             "pixel_values_videos")
        kind = "image" if pixel_values is not None else "video"
        want = "image" if self.group_size == 4 else "video"
        if kind != want:
            raise ValueError(f"this GeoAlign model has G={self.group_size} and fuses {want}s "
                             f"({'pixel_values' if want == 'image' else 'pixel_values_videos'}), got {kind} input")
        if vggt_pixel_values is None:
            raise ValueError("GeoAlign needs the frames for VGGT: pass vggt_pixel_values (see GeoAlignProcessor)")
        samples = _as_samples(vggt_pixel_values, gather_index)
        if self._pending is not None:
            raise RuntimeError("GeoAlign geometry context is already active (re-entrant forward?)")
        mask = None
        if self.fusion.config.injection_layers:
            if input_ids is None:
                raise ValueError("in-LLM injection (fusion.config.injection_layers) needs input_ids to find the "
                                 "visual-token positions")
            cfg = self.qwen.config
            mask = input_ids == (cfg.image_token_id if kind == "image" else cfg.video_token_id)
        self._pending = _Pending(samples, backend, kind, visual_mask=mask)
        try:
            yield
        finally:
            self._pending = None
            if not torch.is_grad_enabled():
                self._injection = None  # inference: no backward recompute can need the kept layers

    @contextlib.contextmanager
    def without_fusion(self) -> Iterator[None]:
        """Context in which the model is plain Qwen2.5-VL: the vision tower's output goes to the LLM unfused
        (ablations, and reading the raw router queries Q)."""
        prev, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = prev

    def _visual_hook(self, module, args, kwargs, output):
        if self._bypass:
            return None
        pending = self._pending
        if pending is None:
            raise RuntimeError("Qwen's vision tower ran outside GeoAlign: call GeoAlignForConditionalGeneration's "
                               "forward/generate with vggt_pixel_values (or use model.geometry(...))")
        if pending.used:
            raise RuntimeError("Qwen's vision tower ran twice in one GeoAlign forward; expected one visual input")
        pending.used = True
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None:
            raise RuntimeError("cannot find grid_thw in the vision tower call")
        if self.fusion.config.injection_layers:
            q = output if isinstance(output, torch.Tensor) else output.pooler_output
            self._prepare_injection(q, grid_thw, pending)
            return None  # the tower's output goes to the LLM unchanged; the decoder hooks fuse
        if isinstance(output, torch.Tensor):
            return self.fuse_visual_tokens(output, grid_thw, pending.samples, backend=pending.backend)
        q = output.pooler_output
        output.pooler_output = self.fuse_visual_tokens(q, grid_thw, pending.samples, backend=pending.backend)
        return output

    def fuse_visual_tokens(self, q: torch.Tensor, grid_thw: torch.Tensor, samples: list[_SampleGeometry] | Any,
                           gather_index=None, backend: str | None = None) -> torch.Tensor:
        """Q [L_total, D] (the vision tower's merged output for the whole batch, sample-major) -> Q_hat.

        ``samples``: per-sample VGGT frames (as for ``vggt_pixel_values``). One VGGT pass and one fusion stream per
        sample. Raises ValueError when Qwen's grids / token counts do not match the VGGT frames."""
        out = [self._fuse_sample(q_b, s.images, gi, backend)
               for q_b, s, gi in self._split_samples(q, grid_thw, samples, gather_index)]
        return torch.cat(out, dim=0) if len(out) > 1 else out[0]

    def _split_samples(self, q: torch.Tensor, grid_thw: torch.Tensor, samples, gather_index=None):
        """[(Q_b [L_b, D], sample b, gather_index_b [L_b, G])] for the batch's visual tokens Q (sample-major);
        raises ValueError when Qwen's grids / token counts do not match the VGGT frames."""
        if not (isinstance(samples, list) and samples and isinstance(samples[0], _SampleGeometry)):
            samples = _as_samples(samples, gather_index)
        G = self.group_size
        grid = torch.as_tensor(grid_thw).reshape(-1, 3).to("cpu", torch.int64)
        rows_per = [s.num_frames if G == 4 else 1 for s in samples]
        if grid.shape[0] != sum(rows_per):
            raise ValueError(
                f"Qwen encoded {grid.shape[0]} {'images' if G == 4 else 'videos'} (grid_thw rows) but the VGGT inputs "
                f"describe {sum(rows_per)} ({'frames per sample' if G == 4 else 'one video per sample'}: {rows_per})")
        out, row, off = [], 0, 0
        for b, (s, n) in enumerate(zip(samples, rows_per)):
            g = grid[row:row + n]
            row += n
            try:
                qgrid = qwen_grid_for_vggt(s.vggt_grid)
                check_grid_thw(g, s.num_frames, qgrid, G)
            except ValueError as e:
                raise ValueError(f"sample {b}: VGGT frames {tuple(s.images.shape)} (patch grid {s.vggt_grid}) do "
                                 f"not match Qwen's visual tokens: {e}") from e
            L = int((g.prod(-1) // 4).sum())
            if off + L > q.shape[0]:
                raise ValueError(f"sample {b}: Qwen's vision tower produced {q.shape[0]} tokens, fewer than the "
                                 f"grids imply ({off + L}+)")
            gi = s.gather_index
            if gi is None:
                gi = build_gather_index(s.num_frames, s.vggt_grid, qgrid, G)
            elif tuple(gi.shape) != (L, G):
                raise ValueError(f"sample {b}: gather_index has shape {tuple(gi.shape)}, expected [{L}, {G}] "
                                 "(one row per Qwen visual token)")
            out.append((q[off:off + L], s, gi))
            off += L
        if off != q.shape[0]:
            raise ValueError(f"Qwen's vision tower produced {q.shape[0]} visual tokens, the grids imply {off}")
        return out

    def _prepare_injection(self, q: torch.Tensor, grid_thw: torch.Tensor, pending: _Pending) -> None:
        """In-LLM injection, at prefill: run VGGT once per sample and keep its M bank layers for the decoder hooks."""
        cfg = self.fusion.config
        position = {layer: i for i, layer in enumerate(cfg.bank_layers)}
        vp = next(self.vggt.parameters())
        fp = self.fusion.out_proj.weight
        kept = []
        for q_b, s, gi in self._split_samples(q, grid_thw, pending.samples):
            images = s.images.to(device=vp.device, dtype=vp.dtype)
            layers: list = [None] * cfg.num_bank_layers
            self.vggt_calls += 1
            for layer_id, tokens in self.vggt.iter_layers(images[None], cfg.bank_layers, out_dtype=fp.dtype):
                layers[position[layer_id]] = tokens.reshape(-1, tokens.shape[-1]).to(fp.device)
            kept.append((layers, gi.to(device=fp.device, dtype=torch.int64)))
        mask = pending.visual_mask.to(q.device)
        injection = _Injection(mask, kept, pending.backend)
        if int(mask.sum()) != injection.num_tokens:
            raise ValueError(f"input_ids hold {int(mask.sum())} visual placeholder tokens, the vision tower "
                             f"produced {injection.num_tokens}")
        self._injection = injection

    def _decoder_hook(self, module, args, kwargs):
        """Forward pre-hook on an injection decoder layer: hidden_states [B, T, D] at the visual positions are the
        queries; they are replaced by Q_hat. Does nothing without kept geometry or in cached decoding steps."""
        inj = self._injection
        if inj is None or self._bypass:
            return None
        from_args = len(args) > 0
        h = args[0] if from_args else kwargs.get("hidden_states")
        if h is None or tuple(h.shape[:2]) != tuple(inj.visual_mask.shape):
            return None  # a cached decoding step (or text-only call): no visual tokens here
        mask = inj.visual_mask.to(h.device)
        q = h[mask]  # [L_total, D], row-major over (sample, position) = the vision tower's order
        dtype = self.fusion.out_proj.weight.dtype
        out, off = [], 0
        for layers, gi in inj.samples:
            L = int(gi.shape[0])
            out.append(self.fusion(q[off:off + L].to(dtype), layers, gi, backend=inj.backend))
            off += L
        q_hat = torch.cat(out, dim=0) if len(out) > 1 else out[0]
        h = h.masked_scatter(mask.unsqueeze(-1).expand_as(h), q_hat.to(h.dtype))
        if from_args:
            return (h,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    def _fuse_sample(self, q: torch.Tensor, images: torch.Tensor, gather_index: torch.Tensor,
                     backend: str | None) -> torch.Tensor:
        """Route first, then stream this sample's bank layers from VGGT into the fusion."""
        cfg = self.fusion.config
        fp = self.fusion.out_proj.weight
        q = q.to(fp.dtype)
        vp = next(self.vggt.parameters())
        images = images.to(device=vp.device, dtype=vp.dtype)
        gi = gather_index.to(device=q.device, dtype=torch.int64)
        stream = self.fusion.begin(q, gi, backend=backend)          # the router reads only Q: routes known now
        position = {layer: i for i, layer in enumerate(cfg.bank_layers)}
        self.vggt_calls += 1
        for layer_id, tokens in self.vggt.iter_layers(images[None], cfg.bank_layers, out_dtype=q.dtype):
            rows = tokens.reshape(-1, tokens.shape[-1])
            del tokens
            stream.add(position[layer_id], rows.to(q.device))
            del rows
        q_hat, _ = stream.finish()
        return q_hat

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor | None = None, *, vggt_pixel_values=None, gather_index=None,
                fusion_backend: str | None = None, **kwargs):
        """Qwen2.5-VL's forward (all its arguments), with the visual tokens fused with VGGT geometry."""
        with self.geometry(vggt_pixel_values, gather_index, pixel_values=kwargs.get("pixel_values"),
                           pixel_values_videos=kwargs.get("pixel_values_videos"), backend=fusion_backend,
                           input_ids=input_ids):
            return self.qwen(input_ids=input_ids, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *, vggt_pixel_values=None, gather_index=None,
                 fusion_backend: str | None = None, **kwargs):
        """Qwen's ``generate``; geometry is computed once, when the vision tower runs at prefill."""
        if kwargs.get("num_beams", 1) not in (None, 1) or kwargs.get("num_return_sequences", 1) not in (None, 1):
            raise ValueError("GeoAlign generate supports num_beams=1 and num_return_sequences=1 only")
        with self.geometry(vggt_pixel_values, gather_index, pixel_values=kwargs.get("pixel_values"),
                           pixel_values_videos=kwargs.get("pixel_values_videos"), backend=fusion_backend,
                           input_ids=input_ids):
            return self.qwen.generate(input_ids=input_ids, **kwargs)


# ----------------------------------------------------------------------------------------------- helpers
def _text_hidden_size(config) -> int:
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "hidden_size", None):
        return int(text.hidden_size)
    return int(config.hidden_size)


def _vision_config(config):
    return config.vision_config


def _default_fusion_config(qwen_config, vggt_config: VGGTAggregatorConfig) -> GeoAlignConfig:
    """Paper settings (M = latter half of VGGT's layers, K=2, G=4) with D and D' from the two encoders."""
    D = int(getattr(_vision_config(qwen_config), "out_hidden_size", _text_hidden_size(qwen_config)))
    depth = vggt_config.depth
    return GeoAlignConfig(hidden_size=D, geo_dim=vggt_config.out_dim, bank_layers=tuple(range(depth // 2, depth)))


def forward_accepts(name: str) -> bool:
    """Whether the installed Qwen2.5-VL forward takes argument ``name`` (e.g. mm_token_type_ids)."""
    return name in inspect.signature(_qwen_class().forward).parameters


__all__ = ["GeoAlignForConditionalGeneration", "save_fusion", "load_fusion"]
