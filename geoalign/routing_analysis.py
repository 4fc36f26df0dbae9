"""Routing analysis (the paper's Figure 3): which VGGT bank layers the router picks, per input, per frame, per token.

    with model.record_routing(keep_tensors=True) as recorder:
        model(**inputs)                              # or model.generate(**inputs, ...): prefill only
    sample = recorder.samples[0]                     # one SampleRouting per sample, in batch order
    sample.summary()                                 # {"mean_alpha_pct": [M], "selection_freq": [M], ...}

Per sample, with w[l, m] = the routing weight token l gives bank layer m (its alpha where m is among its top-K, else
0; the router's softmax makes each token's weights sum to 1):
  mean_alpha_pct[m]          100 * sum_l w[l, m] / sum_{l, m} w[l, m]          (sums to 100, Figure 3's bars)
  selection_freq[m]          fraction of tokens whose top-K holds layer m      (sums to K)
  per_frame_mean_alpha_pct   the same percentage over each frame's patches: token l's weights count once per patch
                             of the G it covers (so with G = 8 a token counts for both frames of its pair)
Kept only on request (``keep_tensors``): topk_idx / alpha [L, K] and each token's patches as (frame, row, column)
of the VGGT patch grid, from gather_index -- what the per-token heat map needs. Summaries are a few hundred floats
per sample, so recording over a whole benchmark is cheap.

Plots (matplotlib): :func:`plot_layer_bars` (Figure 3 style, legend beside the bars) and :func:`plot_heatmaps` (per
frame, the layer with the highest alpha at each token's patches, one qualitative colour per layer over the frame faded
to grey, a legend naming the layers); :func:`layer_bars_figure` / :func:`heatmaps_figure` return the figures unsaved.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .routing import Routing


@dataclass
class SampleRouting:
    """One sample's routing at prefill. Shapes: M bank layers, S frames, L tokens, K slots, G patches per token."""

    bank_layers: list[int]                      # VGGT layer id of each bank position
    num_frames: int
    grid: tuple[int, int]                       # VGGT patch grid (rows, columns) of every frame
    mean_alpha: torch.Tensor                    # [M] float64, fractions summing to 1
    selection_freq: torch.Tensor                # [M] float64
    per_frame_mean_alpha: torch.Tensor          # [S, M] float64, rows sum to 1 (0 for a frame without tokens)
    num_tokens: int
    topk_idx: torch.Tensor | None = None        # [L, K] int64 bank positions (keep_tensors)
    alpha: torch.Tensor | None = None           # [L, K] float32
    token_cells: torch.Tensor | None = None     # [L, G, 3] int64 (frame, row, column) of each token's patches

    def summary(self) -> dict:
        """JSON-ready percentages (rounded to 1e-4) and counts."""
        def r(t):
            return [round(float(x), 4) for x in t]

        return {"bank_layers": list(self.bank_layers), "num_frames": self.num_frames, "num_tokens": self.num_tokens,
                "grid": list(self.grid), "mean_alpha_pct": r(100 * self.mean_alpha),
                "selection_freq": r(self.selection_freq),
                "per_frame_mean_alpha_pct": [r(100 * row) for row in self.per_frame_mean_alpha]}

    def top_layer_map(self, frame: int) -> torch.Tensor:
        """[rows, cols] int64: the bank position with the highest alpha of the token covering each patch of
        ``frame``; -1 where no token covers the patch (the Qwen crop leaves an odd last row / column out)."""
        if self.token_cells is None or self.topk_idx is None or self.alpha is None:
            raise ValueError("this SampleRouting kept no tensors: record with keep_tensors=True")
        if not 0 <= frame < self.num_frames:
            raise ValueError(f"frame {frame} out of range: the sample has {self.num_frames} frames")
        top = self.topk_idx.gather(1, self.alpha.argmax(dim=1, keepdim=True)).squeeze(1)       # [L]
        cells = self.token_cells.reshape(-1, 3)
        layer = top.repeat_interleave(self.token_cells.shape[1])
        keep = cells[:, 0] == frame
        out = torch.full(self.grid, -1, dtype=torch.int64)
        out[cells[keep, 1], cells[keep, 2]] = layer[keep]
        return out


def summarize(routing: Routing, gather_index: torch.Tensor, num_frames: int, grid: tuple[int, int],
              bank_layers, keep_tensors: bool = False) -> SampleRouting:
    """A SampleRouting from one sample's Routing (topk_idx, alpha [L, K]) and gather_index [L, G] (rows of the
    flattened [S * rows * cols] VGGT layer)."""
    idx, alpha = routing.topk_idx, routing.alpha.float()
    L, M = idx.shape[0], len(bank_layers)
    if gather_index.shape[0] != L:
        raise ValueError(f"routing has {L} tokens but gather_index has {gather_index.shape[0]} rows")
    w = torch.zeros(L, M, dtype=torch.float64, device=idx.device).scatter_add_(1, idx, alpha.double())
    total = w.sum().clamp_min(1e-30)
    mean_alpha = w.sum(0) / total
    chosen = torch.zeros(L, M, dtype=torch.float64, device=idx.device).scatter_(1, idx, 1.0)
    selection = chosen.mean(0) if L else torch.zeros(M, dtype=torch.float64, device=idx.device)
    gi = gather_index.to(device=idx.device, dtype=torch.int64)
    per_frame_rows = grid[0] * grid[1]
    frames = gi // per_frame_rows                                                   # [L, G]
    G = gi.shape[1]
    per_frame = torch.zeros(num_frames, M, dtype=torch.float64, device=idx.device)
    per_frame.index_add_(0, frames.reshape(-1), w.repeat_interleave(G, dim=0))
    per_frame = per_frame / per_frame.sum(1, keepdim=True).clamp_min(1e-30)
    out = SampleRouting(list(int(b) for b in bank_layers), num_frames, tuple(grid), mean_alpha.cpu(),
                        selection.cpu(), per_frame.cpu(), L)
    if keep_tensors:
        rest = gi % per_frame_rows
        out.topk_idx, out.alpha = idx.cpu(), alpha.cpu()
        out.token_cells = torch.stack([frames, rest // grid[1], rest % grid[1]], dim=-1).cpu()
    return out


@dataclass
class RoutingRecorder:
    """Collects a SampleRouting per fused sample (see :meth:`GeoAlignForConditionalGeneration.record_routing`)."""

    keep_tensors: bool = False
    samples: list[SampleRouting] = field(default_factory=list)

    def add(self, routing: Routing, gather_index: torch.Tensor, images: torch.Tensor, bank_layers) -> None:
        """``images``: the sample's VGGT frames [S, 3, H, W] (14-pixel patches)."""
        from .geometry.frames import PATCH_SIZE

        S, _, H, W = images.shape
        self.samples.append(summarize(routing, gather_index, int(S), (H // PATCH_SIZE, W // PATCH_SIZE),
                                      bank_layers, self.keep_tensors))


def routing_by_group(records: list[dict], key: str = "question_type") -> dict[str, dict]:
    """Prediction records carrying ``routing`` (``geoalign eval --save-routing``) grouped by ``record[key]``
    ("all" when absent): {group: {"n": questions, "bank_layers": [M], "mean_alpha_pct": [M]}}, each the mean of its
    questions' per-layer percentages; groups sorted by name."""
    groups: dict[str, list[list[float]]] = {}
    layers = None
    for r in records:
        routing = r.get("routing")
        if not routing:
            continue
        if layers is None:
            layers = list(routing["bank_layers"])
        elif list(routing["bank_layers"]) != layers:
            raise ValueError(f"record {r.get('id')!r} has bank layers {routing['bank_layers']}, others {layers}")
        groups.setdefault(str(r.get(key) or "all"), []).append(list(routing["mean_alpha_pct"]))
    return {g: {"n": len(v), "bank_layers": layers,
                "mean_alpha_pct": [round(sum(col) / len(v), 4) for col in zip(*v)]} for g, v in sorted(groups.items())}


def format_routing_table(groups: dict[str, dict]) -> str:
    """A text table: one row per group, the mean routing weight (%) per bank layer."""
    if not groups:
        return ""
    layers = next(iter(groups.values()))["bank_layers"]
    width = max(len(g) for g in groups) + 2
    head = "routing (mean alpha %)".ljust(width) + "    n " + "".join(f"{'L' + str(v):>7}" for v in layers)
    rows = [g.ljust(width) + f"{d['n']:>5} " + "".join(f"{x:7.1f}" for x in d["mean_alpha_pct"])
            for g, d in groups.items()]
    return "\n".join([head, *rows])


def _save_png(fig, path: str, dpi: int) -> None:
    """Render to memory, then write atomically (geoalign.atomic_files); closes the figure."""
    import io

    import matplotlib.pyplot as plt

    from .atomic_files import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _colours(m: int) -> list:
    """``m`` distinct qualitative colours, none of them grey (the heat map's frame beneath is grey): tab10 without
    its grey, then the light tab20 shades (no light grey), then tab20b's dark shades, then a colour wheel."""
    import matplotlib

    tab20, tab20b = matplotlib.colormaps["tab20"], matplotlib.colormaps["tab20b"]
    palette = [tab20(i) for i in range(0, 20, 2) if i != 14] + [tab20(i) for i in range(1, 20, 2) if i != 15]
    palette += [tab20b(i) for i in range(0, 20, 4)]
    if m > len(palette):
        wheel = matplotlib.colormaps["hsv"]
        palette += [wheel(i / (m - len(palette))) for i in range(m - len(palette))]
    return palette[:m]


def layer_bars_figure(summaries: list[dict], names: list[str]):
    """The figure :func:`plot_layer_bars` saves: one bar per input (or question-type group) per bank layer, the
    legend beside the axes (outside the bars) in one column, for any number of groups."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    if not summaries:
        raise ValueError("no routing to plot")
    layers = summaries[0]["bank_layers"]
    n, M = len(summaries), len(layers)
    x = np.arange(M)
    width = 0.8 / n
    colours = _colours(n)
    hatch_from = 9                              # after tab10's 9 colours come their light shades: hatch those
    entries = n + 1
    axes_w = min(16.0, max(5.0, M * (0.3 + 0.08 * n)))
    legend_w = min(4.5, 0.9 + 0.065 * max(len(str(v)) for v in list(names) + ["uniform (1/M)"]))
    height = max(3.8 if n <= 6 else 5.0, 0.2 * entries + 1.4)
    fig = plt.figure(figsize=(axes_w + legend_w + 0.8, height), layout="constrained")
    ax = fig.add_subplot()
    top = 0.0
    for i, (s, name) in enumerate(zip(summaries, names)):
        ax.bar(x - 0.4 + width * (i + 0.5), s["mean_alpha_pct"], width, color=colours[i], label=name,
               hatch="///" if i >= hatch_from else None, edgecolor="white" if i >= hatch_from else None,
               linewidth=0)
        top = max(top, max(s["mean_alpha_pct"], default=0.0))
    for b in x[:-1]:
        ax.axvline(b + 0.5, color="0.85", lw=0.6, zorder=0)
    ax.set_xticks(x, [str(v) for v in layers])
    ax.set_xlim(-0.5, M - 0.5)
    ax.set_ylim(0, max(top, 100 / M) * 1.08 or 1)
    ax.set_xlabel("VGGT layer (bank)")
    ax.set_ylabel("mean routing weight α (%)")
    ax.set_title("Routing over the bank layers, whole visual sequence", fontsize=10)
    uniform = ax.axhline(100 / M, color="0.3", lw=0.9, ls="--", label=f"uniform ({100 / M:.3g}%)")
    handles = [Patch(facecolor=colours[i], hatch="///" if i >= hatch_from else None, edgecolor="white",
                     label=name) for i, name in enumerate(names[:n])] + [uniform]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def plot_layer_bars(summaries: list[dict], names: list[str], path: str) -> None:
    """Figure 3 style: per bank layer, the mean routing weight (%) of each input, side by side; the legend beside
    the bars. Works for 1 to ~20 inputs or groups (``geoalign eval --save-routing`` plots one per question type)."""
    import matplotlib

    matplotlib.use("Agg")
    fig = layer_bars_figure(summaries, names)
    _save_png(fig, path, dpi=120)


def _faded_grey(img):
    """[H, W, 3] in [0, 1] -> [H, W] luminance squeezed into [0.35, 0.85]: the frame stays legible beneath the layer
    colours without lending them its hue."""
    lum = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    return 0.35 + 0.5 * lum


def heatmaps_figure(samples: list[SampleRouting], frames: list[torch.Tensor], names: list[str], max_frames: int = 4):
    """The figure :func:`plot_heatmaps` saves: one sub-figure per input (its name above its row), one panel per
    shown frame, the layer colours over the frame in faded grey, and a legend naming the layers. Constrained layout
    keeps every title clear of the images for any number of inputs and frames."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .geometry.frames import PATCH_SIZE

    if not samples:
        raise ValueError("no routing to plot")
    layers = samples[0].bank_layers
    colours = _colours(len(layers))
    cmap = ListedColormap(colours)
    cols = max(min(max_frames, s.num_frames) for s in samples)
    H0, W0 = frames[0].shape[-2:]
    cell_w = min(3.2, max(1.5, 14.0 / cols))
    cell_h = cell_w * H0 / W0
    legend_cols = min(len(layers) + 1, max(3, int((cols * cell_w) // 1.05)), 13)
    legend_h = 0.45 + 0.22 * -(-(len(layers) + 1) // legend_cols)
    row_h = cell_h + 0.75
    fig = plt.figure(figsize=(max(cols * (cell_w + 0.1) + 0.3, 4.5), len(samples) * row_h + legend_h + 0.5),
                     layout="constrained")
    subfigs = fig.subfigures(len(samples) + 1, 1, height_ratios=[row_h] * len(samples) + [legend_h], squeeze=False)
    subfigs = subfigs[:, 0]
    for sf, s, imgs, name in zip(subfigs, samples, frames, names):
        plural = "s" if s.num_frames != 1 else ""
        sf.suptitle(f"{name} ({s.num_frames} frame{plural})", fontsize=9, fontweight="bold")
        axes = sf.subplots(1, cols, squeeze=False)[0]
        chosen = np.unique(np.linspace(0, s.num_frames - 1, min(cols, s.num_frames)).round().astype(int))
        for c, ax in enumerate(axes):
            ax.set_axis_off()
            if c >= len(chosen):
                continue
            f = int(chosen[c])
            img = imgs[f].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            H, W = img.shape[:2]
            ax.imshow(_faded_grey(img), cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
            top = s.top_layer_map(f).numpy()
            ax.imshow(np.ma.masked_less(top, 0), cmap=cmap, vmin=-0.5, vmax=len(layers) - 0.5, alpha=0.7,
                      interpolation="nearest", extent=(0, top.shape[1] * PATCH_SIZE, top.shape[0] * PATCH_SIZE, 0))
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_title(f"frame {f}", fontsize=8)
    handles = [Patch(facecolor=colours[i], edgecolor="0.3", linewidth=0.5, label=f"layer {v}")
               for i, v in enumerate(layers)]
    handles.append(Patch(facecolor="0.6", edgecolor="0.3", linewidth=0.5, label="no token"))
    legend_rows = -(-len(handles) // legend_cols)
    legend_cols = -(-len(handles) // legend_rows)            # balanced rows; the legend fills column by column,
    handles = [handles[r * legend_cols + c] for c in range(legend_cols) for r in range(legend_rows)
               if r * legend_cols + c < len(handles)]          # so order the handles to read row by row
    subfigs[-1].legend(handles=handles, loc="center", ncol=legend_cols, fontsize=8, frameon=False,
                       title="highest-α bank layer (VGGT layer id)", title_fontsize=8)
    fig.suptitle("Highest-α bank layer per token", fontsize=10)
    return fig


def plot_heatmaps(samples: list[SampleRouting], frames: list[torch.Tensor], names: list[str], path: str,
                  max_frames: int = 4) -> None:
    """Per input (rows) and frame (up to ``max_frames``, evenly spaced), the bank layer with the highest alpha at
    each token's patches, over the frame faded to grey beneath. ``frames``: each input's VGGT frames [S, 3, H, W]
    in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    fig = heatmaps_figure(samples, frames, names, max_frames=max_frames)
    _save_png(fig, path, dpi=110)


@contextlib.contextmanager
def record_routing(model, keep_tensors: bool = False):
    """Context that records each sample ``model`` (a GeoAlignModel) fuses (prefill only) into a RoutingRecorder it
    yields."""
    if model.fusion.config.injection_layers:
        raise ValueError("routing recording covers the pre-LLM fusion; this model injects geometry inside the "
                         f"LLM (injection_layers={list(model.fusion.config.injection_layers)})")
    if model.fusion.config.is_progressive:
        raise ValueError("routing recording covers the routed bank fusion; this model uses the progressive "
                         f"fusion (progressive_geo_layers={list(model.fusion.config.progressive_geo_layers)}), "
                         "which has no routes")
    if model.routing_recorder is not None:
        raise RuntimeError("record_routing() is already active on this model")
    model.routing_recorder = recorder = RoutingRecorder(keep_tensors=keep_tensors)
    try:
        yield recorder
    finally:
        model.routing_recorder = None
