"""GeoAlignConfig: the hyper-parameters of the GeoAlign fusion module (paper eqs. 1-8)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from .backends.registry import ALL_BACKENDS

BACKENDS = ("auto",) + ALL_BACKENDS
FEATURE_USAGES = ("dynamic", "single", "mean", "dense")
BANK_SELECTIONS = ("latter", "former", "uniform", "explicit")
PROJECTORS = ("shared", "split")
FUSIONS = ("add", "film", "gated_2d", "gated_2d3d")
GATE_GRANULARITIES = ("channel", "token")


def select_bank_layers(selection: str, size: int, depth: int) -> tuple[int, ...]:
    """Bank layer ids for a named selection of `size` layers out of an encoder of `depth` layers (ids from 0).

    latter  the last `size` layers (paper default: 12..23 of 24)
    former  the first `size` layers (0..size-1)
    uniform every (depth/size)-th layer, ending at the last: floor((j+1)*depth/size) - 1 (12 of 24: 1, 3, ..., 23)
    """
    if not 1 <= size <= depth:
        raise ValueError(f"GeoAlignConfig.bank_size must be in [1, geo_depth={depth}], got {size}")
    if selection == "latter":
        return tuple(range(depth - size, depth))
    if selection == "former":
        return tuple(range(size))
    if selection == "uniform":
        return tuple((j + 1) * depth // size - 1 for j in range(size))
    raise ValueError(f"unknown bank_selection {selection!r}; expected one of {BANK_SELECTIONS}")


@dataclass
class GeoAlignConfig:
    """Shapes and options of :class:`geoalign.GeoAlignFusion`.

    hidden_size       D, width of the MLLM's visual tokens Q (Qwen2.5-VL-3B: 2048)
    geo_dim           D', width of one VGGT patch row (concat(frame, global) = 2048)
    bank_layers       VGGT aggregator layer ids that form the bank, in bank order (default 12..23, M = 12)
    top_k             K, layers selected per visual token
    group_size        G, raw patch rows per visual token (4: a frame's 2x2 group; 8: two frames in Qwen's video path)
    projector_hidden  H, hidden width of the shared projector f_phi (VG-LLM's merger uses 4096)
    router_hidden     hidden width of the router f_theta
    layer_norm_eps    eps of the per-layer LayerNorms
    backend           default backend: "auto" (triton on CUDA when available, else torch), "reference", "torch",
                      "triton", "cuda"

    Ablation variants (paper Table 4; every default is the paper's choice):
    feature_usage     "dynamic" (Top-K routing), "single" (one fixed bank layer, ``single_layer``), "mean" (uniform
                      average over the bank), "dense" (softmax over all M, no Top-K). top_k is used by "dynamic" only.
    single_layer      VGGT layer id used by feature_usage="single" (paper: 22); must be in the bank
    bank_selection    how bank_layers is derived: "latter" (default), "former", "uniform" half/``bank_size`` of
                      ``geo_depth`` layers; "explicit" = bank_layers as given. Passing bank_layers alone means
                      "explicit"; passing both requires them to agree. bank_layers is the one resolved truth.
    bank_size         M for a derived selection (default geo_depth // 2)
    geo_depth         number of layers of the geometry encoder (VGGT: 24) for derived selections
    projector         "shared" (one f_phi: ``projector.fc1/fc2``) or "split" (one per bank layer: ``projectors.{i}``)
    fusion            eq. 8 variant: "add" Q + W_out F; "film" Q*(1 + W_s F) + W_out F; "gated_2d"
                      Q + W_out(sigmoid(W_g Q + b_g) * F); "gated_2d3d" Q + W_out(sigmoid(W_g [Q; F] + b_g) * F)
    gate_granularity  gated fusions only: "channel" (a D-wide gate) or "token" (one scalar gate per visual token)
    injection_layers  () = before the LLM (default); else LLM decoder layer ids whose input visual hidden states
                      are the queries and are replaced by Q_hat (paper: early 9, mid 18, late 27, multi (9, 18, 27))

    GAP-MLLM's multi-level progressive fusion (geoalign.progressive; the three id lists empty = off, the default).
    With J levels, level j pairs a Qwen ViT block with a VGGT layer and fuses them with a token-level gate; the last
    level pairs the vision tower's own output Q with its VGGT layer and replaces the pre-LLM visual tokens, each
    earlier level is added to the visual hidden states after one early decoder layer (DeepStack). When on, the routed
    bank (bank_layers, top_k, feature_usage, projector, router_hidden) is not used, and fusion="gated_2d3d",
    gate_granularity="token" are required (they name the per-level fusion); injection_layers must be empty.
    progressive_vit_blocks     J-1 Qwen ViT block ids (0-based, strictly increasing) of the intermediate levels
    progressive_geo_layers     J VGGT layer ids (strictly increasing), the last one for the final level
    progressive_inject_layers  J-1 LLM decoder layer ids (no repeats): level j's fused tokens are added to the output
                               of decoder layer progressive_inject_layers[j] at the visual positions (prefill only)
    progressive_vit_hidden     C, the ViT width the level mergers read (Qwen2.5-VL: 1280)
    """

    hidden_size: int = 2048
    geo_dim: int = 2048
    bank_layers: Sequence[int] | None = None  # resolved in __post_init__ (default: latter half = 12..23)
    top_k: int = 2
    group_size: int = 4
    projector_hidden: int = 4096
    router_hidden: int = 512
    layer_norm_eps: float = 1e-5
    backend: str = "auto"
    feature_usage: str = "dynamic"
    single_layer: int | None = None
    bank_selection: str | None = None
    bank_size: int | None = None
    geo_depth: int = 24
    projector: str = "shared"
    fusion: str = "add"
    gate_granularity: str = "channel"
    injection_layers: Sequence[int] = ()
    progressive_vit_blocks: Sequence[int] = ()
    progressive_geo_layers: Sequence[int] = ()
    progressive_inject_layers: Sequence[int] = ()
    progressive_vit_hidden: int = 1280

    def __post_init__(self) -> None:
        self._resolve_bank()
        for name in ("hidden_size", "geo_dim", "top_k", "group_size", "projector_hidden", "router_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GeoAlignConfig.{name} must be a positive int, got {value!r}")
        if len(self.bank_layers) == 0:
            raise ValueError("GeoAlignConfig.bank_layers must name at least one layer, got an empty list")
        if len(set(self.bank_layers)) != len(self.bank_layers):
            raise ValueError(f"GeoAlignConfig.bank_layers has repeated layers: {self.bank_layers}")
        if any(i < 0 for i in self.bank_layers):
            raise ValueError(f"GeoAlignConfig.bank_layers must be non-negative layer ids, got {self.bank_layers}")
        if self.top_k > self.num_bank_layers:
            raise ValueError(
                f"GeoAlignConfig.top_k must be <= the number of bank layers M={self.num_bank_layers}, got K={self.top_k}"
            )
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"GeoAlignConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        self.layer_norm_eps = float(self.layer_norm_eps)
        if self.backend not in BACKENDS:
            raise ValueError(f"GeoAlignConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        self._check_variants()

    def _resolve_bank(self) -> None:
        """One source of truth: bank_layers, derived from (bank_selection, bank_size, geo_depth) unless explicit."""
        for name in ("geo_depth",) + (("bank_size",) if self.bank_size is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GeoAlignConfig.{name} must be a positive int, got {value!r}")
        sel = self.bank_selection
        if sel is not None and sel not in BANK_SELECTIONS:
            raise ValueError(f"GeoAlignConfig.bank_selection must be one of {BANK_SELECTIONS}, got {sel!r}")
        if self.bank_layers is None:
            if sel == "explicit":
                raise ValueError("GeoAlignConfig.bank_selection='explicit' needs bank_layers")
            sel = sel or "latter"
            size = self.bank_size if self.bank_size is not None else self.geo_depth // 2
            self.bank_layers = select_bank_layers(sel, size, self.geo_depth)
        else:
            self.bank_layers = tuple(int(i) for i in self.bank_layers)
            if sel is None:
                sel = "explicit"
            elif sel != "explicit":
                size = self.bank_size if self.bank_size is not None else len(self.bank_layers)
                derived = select_bank_layers(sel, size, self.geo_depth)
                if derived != self.bank_layers:
                    raise ValueError(f"GeoAlignConfig.bank_layers {list(self.bank_layers)} disagrees with "
                                     f"bank_selection={sel!r} (bank_size={size}, geo_depth={self.geo_depth}): "
                                     f"{list(derived)}; pass one or the other")
            if self.bank_size is not None and self.bank_size != len(self.bank_layers):
                raise ValueError(f"GeoAlignConfig.bank_size={self.bank_size} disagrees with bank_layers "
                                 f"{list(self.bank_layers)} (M={len(self.bank_layers)})")
        self.bank_selection = sel
        self.bank_size = len(self.bank_layers)

    def _check_variants(self) -> None:
        for name, allowed in (("feature_usage", FEATURE_USAGES), ("projector", PROJECTORS), ("fusion", FUSIONS),
                              ("gate_granularity", GATE_GRANULARITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GeoAlignConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.feature_usage == "single":
            if self.single_layer is None:
                raise ValueError("GeoAlignConfig.feature_usage='single' needs single_layer (a VGGT layer id in "
                                 f"bank_layers {list(self.bank_layers)}; the paper uses 22)")
            if isinstance(self.single_layer, bool) or not isinstance(self.single_layer, int):
                raise ValueError(f"GeoAlignConfig.single_layer must be an int, got {self.single_layer!r}")
            if self.single_layer not in self.bank_layers:
                raise ValueError(f"GeoAlignConfig.single_layer={self.single_layer} is not in the bank "
                                 f"{list(self.bank_layers)}")
        elif self.single_layer is not None:
            raise ValueError(f"GeoAlignConfig.single_layer is only used by feature_usage='single', got "
                             f"feature_usage={self.feature_usage!r} with single_layer={self.single_layer}")
        if self.gate_granularity != "channel" and not self.fusion.startswith("gated"):
            raise ValueError(f"GeoAlignConfig.gate_granularity={self.gate_granularity!r} needs a gated fusion "
                             f"('gated_2d' or 'gated_2d3d'), got fusion={self.fusion!r}")
        inj = tuple(self.injection_layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in inj):
            raise ValueError(f"GeoAlignConfig.injection_layers must be non-negative LLM decoder layer ids, got {inj}")
        if len(set(inj)) != len(inj):
            raise ValueError(f"GeoAlignConfig.injection_layers has repeated layers: {inj}")
        self.injection_layers = tuple(sorted(inj))
        self._check_progressive()

    def _check_progressive(self) -> None:
        """The progressive-fusion fields: id lists of matching lengths, and no option that contradicts them."""
        for name in ("progressive_vit_blocks", "progressive_geo_layers", "progressive_inject_layers"):
            ids = getattr(self, name)
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise ValueError(f"GeoAlignConfig.{name} must be a list of layer ids, got {ids!r}")
            ids = tuple(ids)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"GeoAlignConfig.{name} must be non-negative int layer ids, got {list(ids)}")
            setattr(self, name, ids)
        value = self.progressive_vit_hidden
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"GeoAlignConfig.progressive_vit_hidden must be a positive int, got {value!r}")
        vit, geo, inj = self.progressive_vit_blocks, self.progressive_geo_layers, self.progressive_inject_layers
        if not (vit or geo or inj):
            return
        if not geo:
            raise ValueError(f"GeoAlignConfig.progressive_geo_layers must name J >= 1 VGGT layers (one per level, the "
                             f"last for the final level) when progressive_vit_blocks={list(vit)} or "
                             f"progressive_inject_layers={list(inj)} is set")
        J = len(geo)
        if len(vit) != J - 1:
            raise ValueError(f"GeoAlignConfig.progressive_vit_blocks must hold J-1={J - 1} ViT block ids (one per "
                             f"intermediate level; progressive_geo_layers has J={J}), got {list(vit)}")
        if len(inj) != J - 1:
            raise ValueError(f"GeoAlignConfig.progressive_inject_layers must hold J-1={J - 1} decoder layer ids (one "
                             f"per intermediate level; progressive_geo_layers has J={J}), got {list(inj)}")
        for name, ids in (("progressive_vit_blocks", vit), ("progressive_geo_layers", geo)):
            if any(b <= a for a, b in zip(ids, ids[1:])):
                raise ValueError(f"GeoAlignConfig.{name} must be strictly increasing (levels go from shallow to "
                                 f"deep), got {list(ids)}")
        if len(set(inj)) != len(inj):
            raise ValueError(f"GeoAlignConfig.progressive_inject_layers has repeated layers: {list(inj)}")
        if self.injection_layers:
            raise ValueError(f"GeoAlignConfig.injection_layers={list(self.injection_layers)} cannot be combined with "
                             "the progressive fusion (progressive_geo_layers): it replaces the routed bank fusion, "
                             "and its levels are injected by progressive_inject_layers")
        if self.fusion != "gated_2d3d" or self.gate_granularity != "token":
            raise ValueError(f"GeoAlignConfig.progressive_geo_layers: the progressive fusion's levels use the "
                             f"token-level gate; set fusion='gated_2d3d', gate_granularity='token' (got "
                             f"fusion={self.fusion!r}, gate_granularity={self.gate_granularity!r})")

    @property
    def is_progressive(self) -> bool:
        """Whether this config enables GAP-MLLM's multi-level progressive fusion (instead of the routed bank)."""
        return len(self.progressive_geo_layers) > 0

    @property
    def num_progressive_levels(self) -> int:
        """J, the number of progressive levels (0 when off)."""
        return len(self.progressive_geo_layers)

    @property
    def routed_k(self) -> int:
        """Number of bank layers each token uses: K for "dynamic", 1 for "single", M for "mean" and "dense"."""
        return {"dynamic": self.top_k, "single": 1}.get(self.feature_usage, self.num_bank_layers)

    @property
    def has_router(self) -> bool:
        """Whether the fusion has a router f_theta ("dynamic" and "dense" feature usage)."""
        return self.feature_usage in ("dynamic", "dense")

    @property
    def is_paper_default_path(self) -> bool:
        """Shared projector + residual add: the output stage is W_out (W2 h_bar + b2) (fast output kernels apply)."""
        return self.projector == "shared" and self.fusion == "add"

    @property
    def num_bank_layers(self) -> int:
        """M, the number of layers in the bank."""
        return len(self.bank_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bank_layers"] = list(self.bank_layers)
        for name in ("injection_layers", "progressive_vit_blocks", "progressive_geo_layers",
                     "progressive_inject_layers"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeoAlignConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GeoAlignConfig keys: {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .atomic_files import write_json

        write_json(os.path.join(directory, "geoalign_config.json"), self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "GeoAlignConfig":
        path = os.path.join(directory, "geoalign_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no geoalign_config.json in {directory!s}")
        with open(path) as f:
            return cls.from_dict(json.load(f))
