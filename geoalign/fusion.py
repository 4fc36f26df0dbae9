"""GeoAlignFusion: Top-K routed fusion of M geometry layers into the MLLM's visual tokens (paper eqs. 1-8).

One module, four backends (``reference``, ``torch``, ``triton``, ``cuda``; the one list is
``geoalign.backends.registry.REGISTRY``) behind one interface:

    fusion = GeoAlignFusion(GeoAlignConfig())
    q_hat = fusion(q, layers, gather_index)                   # layers: a sequence or an iterator of M tensors
    q_hat, routing = fusion(q, layers, gather_index, return_routing=True)

    stream = fusion.begin(q, gather_index)                    # route first ...
    for i, layer in enumerate(vggt_layers): stream.add(i, layer)   # ... then consume each layer as it is produced
    q_hat = stream.finish()
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .backends import get_backend, resolve_backend_name
from .config import GeoAlignConfig
from .layers import MLP
from .routing import Routing

def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class FusionStream:
    """Streaming state of one fused forward: routes are computed at construction, then ``add(i, layer)`` consumes
    bank layer i (bank position 0..M-1, any order, each once) and ``finish()`` returns Q_hat. With a sparse backend
    no layer is referenced after ``add`` returns; autograd stays intact through all of it."""

    def __init__(self, fusion: "GeoAlignFusion", q: torch.Tensor, gather_index: torch.Tensor, backend: str,
                 fold_output: bool = False):
        fusion.check_query(q)
        fusion.check_gather_index(gather_index, q)
        self.fusion, self.q, self.gather_index, self.backend_name = fusion, q, gather_index, backend
        self._added = [False] * fusion.config.num_bank_layers
        self._finished = False
        # one device->host copy, checked against each layer's row count (skipped with check_inputs off)
        self._max_row = int(gather_index.max()) if fusion.check_inputs else None
        self._stream = get_backend(backend, bool(fold_output)).open_stream(fusion, q, gather_index)

    @property
    def routing(self) -> Routing:
        """The routes (Top-K ids [L, K], weights [L, K]): known when the stream opens, before any layer is added."""
        return self._stream.routing

    def add(self, i: int, layer: torch.Tensor) -> None:
        """Consume bank layer i: ``layer`` [N, D'] holds the raw VGGT patch rows that gather_index points into."""
        if self._finished:
            raise RuntimeError("this FusionStream has finished; call fusion.begin(...) for a new forward")
        M = len(self._added)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < M:
            raise ValueError(f"bank position must be an int in [0, {M}), got {i!r}")
        if self._added[i]:
            raise ValueError(f"bank layer {i} was already added to this stream")
        self.fusion.check_layer(i, layer, self.q, self._max_row)
        self._added[i] = True
        self._stream.add(i, layer)

    def finish(self) -> tuple[torch.Tensor, Routing]:
        """Q_hat [L, D] and the Routing. Every bank layer must have been added."""
        if self._finished:
            raise RuntimeError("this FusionStream has already finished")
        missing = [i for i, done in enumerate(self._added) if not done]
        if missing:
            raise ValueError(f"expected {len(self._added)} bank layers, got {len(self._added) - len(missing)}; "
                             f"missing bank positions {missing}")
        self._finished = True
        return self._stream.finish()


class GeoAlignFusion(nn.Module):
    """GeoAlign's fusion module. Parameter names are a checkpoint contract:

    layer_norms.{i}.{weight,bias}       per-layer LayerNorm_i over each D' patch row
    projector.fc1 [H, G*D'], fc2 [D, H] shared projector f_phi (exact GELU between)
    router.fc1 [R, D], fc2 [M, R]       router f_theta on Q (exact GELU between)
    out_proj [D, D] (no bias)           W_out

    Table 4 variants (config options) change only these:
    projector="split"                   projectors.{i}.fc1/fc2 (one MLP per bank layer) instead of projector.*
    feature_usage="single"/"mean"       no router
    fusion="film"                       + film_scale [D, D] (no bias); out_proj is W_shift
    fusion="gated_2d"/"gated_2d3d"      + gate [D or 1, D] / [D or 1, 2D] with bias (width 1: gate_granularity="token")

    A config with GAP-MLLM's progressive fusion (``config.is_progressive``) builds the other fusion module instead:
    ``GeoAlignFusion(config)`` then returns a :class:`geoalign.progressive.ProgressiveFusion` (its own class, with
    only that fusion's parameters, ``levels.{j}.*`` and ``mergers.{j}.*``, and no routed bank).
    """

    def __new__(cls, config: GeoAlignConfig | None = None):
        if cls is GeoAlignFusion and config is not None and config.is_progressive:
            from .progressive import ProgressiveFusion

            return ProgressiveFusion(config)      # not a GeoAlignFusion, so this __init__ does not run on it
        return super().__new__(cls)

    def __init__(self, config: GeoAlignConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else GeoAlignConfig()
        #: check input values too: q finite, gather_index rows in [0, N). Three device->host syncs per forward;
        #: switch off for CUDA graphs and torch.compile (shapes, dtypes and devices are always checked, and the
        #: kernels never read or write through an out-of-range row: they give NaN rows instead)
        self.check_inputs = True
        M, G = config.num_bank_layers, config.group_size
        D = config.hidden_size
        self.layer_norms = nn.ModuleList(nn.LayerNorm(config.geo_dim, eps=config.layer_norm_eps) for _ in range(M))
        if config.projector == "shared":
            self.projector = MLP(G * config.geo_dim, config.projector_hidden, D)
        else:
            self.projectors = nn.ModuleList(MLP(G * config.geo_dim, config.projector_hidden, D) for _ in range(M))
        if config.has_router:
            self.router = MLP(D, config.router_hidden, M)
        self.out_proj = nn.Linear(D, D, bias=False)
        if config.fusion == "film":
            self.film_scale = nn.Linear(D, D, bias=False)
        elif config.fusion in ("gated_2d", "gated_2d3d"):
            width = D if config.gate_granularity == "channel" else 1
            self.gate = nn.Linear(D if config.fusion == "gated_2d" else 2 * D, width)

    @property
    def weight_like(self) -> torch.Tensor:
        """A parameter with the fusion's dtype and device (out_proj's)."""
        return self.out_proj.weight

    def router_hidden(self, q: torch.Tensor) -> torch.Tensor:
        """The router's hidden layer GELU(V1 q + c1) [L, R] (its fc2 gives the logits: ``self.router(q)``)."""
        return nn.functional.gelu(self.router.fc1(q))

    def inject(self, q: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """Eq. 8 and its Table 4 variants: q [L, D], f_hat [L, D] (both the parameter dtype) -> q_hat [L, D].

        add         Q + W_out F
        film        Q * (1 + W_s F) + W_out F                      (W_s = film_scale; W_out plays W_shift)
        gated_2d    Q + W_out(sigmoid(W_g Q + b_g) * F)            (gate [L, D] or [L, 1] with gate_granularity="token")
        gated_2d3d  Q + W_out(sigmoid(W_g [Q; F] + b_g) * F)
        """
        kind = self.config.fusion
        if kind == "add":
            return q + self.out_proj(f_hat)
        if kind == "film":
            return q * (1.0 + self.film_scale(f_hat)) + self.out_proj(f_hat)
        gate_in = q if kind == "gated_2d" else torch.cat([q, f_hat], dim=-1)
        return q + self.out_proj(torch.sigmoid(self.gate(gate_in)) * f_hat)

    def projector_for(self, i: int) -> MLP:
        """The projector MLP of bank position i: the shared f_phi, or layer i's own with projector="split"."""
        return self.projector if self.config.projector == "shared" else self.projectors[i]

    # ----------------------------------------------------------------------------------------------- interface
    def forward(self, q: torch.Tensor, layers: Iterable[torch.Tensor], gather_index: torch.Tensor,
                backend: str | None = None, return_routing: bool = False, fold_output: bool = False):
        """q [L, D] (parameter dtype); layers: M tensors [N, D'] in bank order (a sequence or an iterator, consumed
        one at a time); gather_index [L, G] int64 rows into each layer. Flat over the batch.
        Returns q_hat [L, D], or (q_hat, Routing) with return_routing=True.
        fold_output: inference only (used when no gradient is needed): W_out.W2 folded into one [D, H] GEMM."""
        stream = self.begin(q, gather_index, backend=backend, fold_output=fold_output)
        count = 0
        for count, layer in enumerate(layers, start=1):
            if count > self.config.num_bank_layers:
                raise ValueError(f"expected {self.config.num_bank_layers} bank layers, got more")
            stream.add(count - 1, layer)
            del layer  # an iterator's layer can be freed now
        q_hat, routing = stream.finish()
        return (q_hat, routing) if return_routing else q_hat

    def begin(self, q: torch.Tensor, gather_index: torch.Tensor, backend: str | None = None,
              fold_output: bool = False) -> FusionStream:
        """Start a streaming forward: routes Q now; feed layers with ``add(i, layer)``, then ``finish()``."""
        name = resolve_backend_name(backend, self.config.backend, q.device if isinstance(q, torch.Tensor)
                                    else torch.device("cpu"))
        return FusionStream(self, q, gather_index, name, fold_output)

    def route(self, q: torch.Tensor, backend: str | None = None) -> Routing:
        """(topk_idx [L, K] int64, alpha [L, K]) for queries q [L, D]. Ties go to the lower bank index."""
        self.check_query(q)
        return get_backend(resolve_backend_name(backend, self.config.backend, q.device)).routes(self, q)

    # ----------------------------------------------------------------------------------------------- checks
    def check_query(self, q) -> None:
        D = self.config.hidden_size
        p = self.out_proj.weight
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor [L, {D}], got {_describe(q)}")
        if q.dim() != 2 or q.shape[1] != D:
            raise ValueError(f"q must have shape [L, {D}], got {tuple(q.shape)}")
        if q.shape[0] == 0:
            raise ValueError("q is empty (L=0): expected at least one visual token")
        if q.dtype != p.dtype:
            raise TypeError(f"q must have the fusion's parameter dtype {p.dtype}, got {q.dtype}")
        if q.device != p.device:
            raise ValueError(f"q must be on the fusion's device {p.device}, got {q.device}")
        if self.check_inputs and not bool(torch.isfinite(q).all()):
            raise ValueError("q contains NaN or inf")

    def check_gather_index(self, gather_index, q: torch.Tensor) -> None:
        L, G = q.shape[0], self.config.group_size
        if not isinstance(gather_index, torch.Tensor):
            raise TypeError(f"gather_index must be a torch.Tensor [L, G]=[{L}, {G}], got {_describe(gather_index)}")
        if gather_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"gather_index must be int64 (or int32), got {gather_index.dtype}")
        if tuple(gather_index.shape) != (L, G):
            raise ValueError(f"gather_index must have shape [L, G]=[{L}, {G}], got {tuple(gather_index.shape)}")
        if gather_index.device != q.device:
            raise ValueError(f"gather_index must be on q's device {q.device}, got {gather_index.device}")
        low = int(gather_index.min()) if self.check_inputs else 0
        if low < 0:
            raise ValueError(f"gather_index out of range: expected rows >= 0, got {low}")

    def check_layer(self, i: int, layer, q: torch.Tensor, max_row: int | None) -> None:
        Dg = self.config.geo_dim
        if not isinstance(layer, torch.Tensor):
            raise TypeError(f"bank layer {i} must be a torch.Tensor [N, {Dg}], got {_describe(layer)}")
        if layer.dim() != 2 or layer.shape[1] != Dg:
            raise ValueError(f"bank layer {i} must have shape [N, {Dg}], got {tuple(layer.shape)}")
        if not layer.is_floating_point():
            raise TypeError(f"bank layer {i} must be a floating-point tensor, got {layer.dtype}")
        if layer.device != q.device:
            raise ValueError(f"bank layer {i} must be on q's device {q.device}, got {layer.device}")
        if max_row is not None and max_row >= layer.shape[0]:
            raise ValueError(f"gather_index out of range: it points at row {max_row}, but bank layer {i} has "
                             f"{layer.shape[0]} rows")
        if layer.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"bank layer {i} requires grad, but the geometry encoder is frozen and the fusion "
                             "computes no gradient into it; pass layer.detach()")
