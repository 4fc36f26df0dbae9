"""VGGTAggregator: VGGT's alternating frame/global attention aggregator, with streaming layer output.

Our own implementation of the VGGT-1B aggregator (DINOv2 ViT-L/14-reg patch embedding, then ``depth`` pairs of
frame-attention and global-attention blocks). Parameter names and shapes equal the ``aggregator.*`` entries of the
official facebook/VGGT-1B checkpoint, so :func:`geoalign.geometry.load_aggregator_weights` loads it as is.

Layer i's output is ``concat(frame_out_i, global_out_i)`` of width ``2 * embed_dim`` (2048), where ``frame_out_i``
is the output of frame block i and ``global_out_i`` the output of global block i. The first
``patch_start_idx = 1 + num_register_tokens`` (5) tokens of each frame are special (camera, registers).

:meth:`VGGTAggregator.iter_layers` hands the requested layers out one at a time and stops after the last one;
:meth:`VGGTAggregator.forward` is the plain reference that returns all layers as a list (as VGGT does).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .config import VGGTAggregatorConfig
from .layers import Block, DinoV2Backbone, Rope2D, grid_positions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pixel values may overshoot [0, 1] by this much (bicubic resize) and still count as [0, 1] images.
PIXEL_RANGE_TOL = 1e-3


class _LayerStream:
    """Running state of one aggregator pass: the residual stream and the RoPE tables. Holds no layer outputs."""

    def __init__(self, tokens: torch.Tensor, rope: Rope2D | None, b: int, s: int, p: int) -> None:
        self.tokens = tokens          # [B*S, P, C]
        self.rope = rope
        self.b, self.s, self.p = b, s, p
        self.next_layer = 0


def _resolve_autocast(device: torch.device, autocast: bool | torch.dtype | None) -> torch.dtype | None:
    if autocast is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if autocast is False:
        return None
    if autocast is True:
        return torch.bfloat16
    if isinstance(autocast, torch.dtype):
        return autocast
    raise ValueError(f"autocast must be None, a bool or a torch.dtype, got {autocast!r}")


class VGGTAggregator(nn.Module):
    """The VGGT aggregator. Frozen (``requires_grad=False``, eval mode) unless built with ``frozen=False``.

    Input images: float [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1], H and W multiples of ``patch_size``;
    ImageNet normalisation happens inside.
    """

    def __init__(self, config: VGGTAggregatorConfig | None = None, frozen: bool = True) -> None:
        super().__init__()
        cfg = config if config is not None else VGGTAggregatorConfig()
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.patch_start_idx = cfg.patch_start_idx
        self.depth = cfg.depth
        self.patch_embed = DinoV2Backbone(
            img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.patch_embed_dim, depth=cfg.patch_embed_depth,
            num_heads=cfg.patch_embed_heads, mlp_ratio=cfg.patch_embed_mlp_ratio,
            num_register_tokens=cfg.num_register_tokens, init_values=cfg.patch_embed_init_values,
            interpolate_antialias=cfg.interpolate_antialias, interpolate_offset=cfg.interpolate_offset,
            qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias, ffn_bias=cfg.ffn_bias,
        )

        def make_block() -> Block:
            return Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                         ffn_bias=cfg.ffn_bias, qk_norm=cfg.qk_norm, init_values=cfg.init_values, norm_eps=1e-5)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        # index 0: the first frame's tokens; index 1: shared by all other frames.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, cfg.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, cfg.embed_dim))
        if not self.camera_token.is_meta:
            nn.init.normal_(self.camera_token, std=1e-6)
            nn.init.normal_(self.register_token, std=1e-6)
        self.register_buffer("_resnet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    # ------------------------------------------------------------------ helpers
    def init_non_persistent_buffers(self) -> None:
        """Fill the normalisation buffers in place, wherever they live (transformers materialises them empty after a
        meta-device build, then calls its ``_init_weights``, which calls this)."""
        with torch.no_grad():
            self._resnet_mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self._resnet_std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def reset_buffers(self) -> None:
        """(Re)create the non-persistent normalisation buffers on the parameters' device (after a meta build)."""
        dev = self.camera_token.device
        self._resnet_mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        self._resnet_std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)

    def train(self, mode: bool = True) -> "VGGTAggregator":
        # A frozen aggregator stays in eval mode (it has no dropout, but downstream code may check .training).
        return super().train(False if getattr(self, "frozen", False) else mode)

    def check_images(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Validate and return images as [B, S, 3, H, W]; raises ValueError naming expected vs got."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor [B, S, 3, H, W] in [0, 1], got {type(images).__name__}")
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise ValueError(f"images must have shape [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}")
        b, s, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 channels (RGB) in dim 2, got shape {tuple(images.shape)}")
        if b == 0 or s == 0 or h == 0 or w == 0:
            raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image height and width must be multiples of the patch size {p}, got H={h}, W={w} "
                f"(use geoalign.geometry.resize_for_vggt)"
            )
        if check_range and images.device.type != "meta":
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= -PIXEL_RANGE_TOL and hi <= 1.0 + PIXEL_RANGE_TOL):
                raise ValueError(
                    f"images must hold pixel values in [0, 1], got min={lo:.4g}, max={hi:.4g} "
                    "(0-255 values or already ImageNet-normalised images?)"
                )
        return images

    def _start(self, images: torch.Tensor) -> _LayerStream:
        """Patch-embed [B, S, 3, H, W] images and add the special tokens: the state before layer 0."""
        b, s, _, hh, ww = images.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        x = images.reshape(b * s, 3, hh, ww)
        x = (x - self._resnet_mean.to(x.dtype)) / self._resnet_std.to(x.dtype)
        patch_tokens = self.patch_embed(x)                                # [B*S, h*w, C]
        del x
        c = patch_tokens.shape[-1]
        cam = self._expand_special(self.camera_token, b, s)
        reg = self._expand_special(self.register_token, b, s)
        tokens = torch.cat([cam, reg, patch_tokens], dim=1)               # [B*S, P, C]
        del patch_tokens
        rope = None
        if self.config.rope_freq > 0:
            pos = grid_positions(h, w, self.patch_start_idx, device=images.device)
            rope = Rope2D(pos, c // self.config.num_heads, self.config.rope_freq)
        return _LayerStream(tokens, rope, b, s, tokens.shape[1])

    @staticmethod
    def _expand_special(tok: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """[1, 2, X, C] -> [B*S, X, C]: slot 0 for each sample's first frame, slot 1 for its other frames."""
        x, c = tok.shape[2], tok.shape[3]
        first = tok[:, :1].expand(b, 1, x, c)
        rest = tok[:, 1:].expand(b, s - 1, x, c)
        return torch.cat([first, rest], dim=1).reshape(b * s, x, c)

    def _step(self, st: _LayerStream) -> tuple[torch.Tensor, torch.Tensor]:
        """Run frame block and global block ``st.next_layer``; returns (frame_out, global_out), each [B, S, P, C]."""
        i = st.next_layer
        b, s, p = st.b, st.s, st.p
        c = st.tokens.shape[-1]
        frame_out = self.frame_blocks[i](st.tokens.reshape(b * s, p, c), rope=st.rope)
        global_out = self.global_blocks[i](frame_out.reshape(b, s * p, c), rope=st.rope)
        st.tokens = global_out.reshape(b * s, p, c)
        st.next_layer = i + 1
        return frame_out.reshape(b, s, p, c), global_out.reshape(b, s, p, c)

    def _contexts(self, device: torch.device, grad: bool, autocast: bool | torch.dtype | None):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        ac = _resolve_autocast(device, autocast)
        if ac is not None:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=ac))
        return stack

    def _resolve_layers(self, layers: Iterable[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.depth))
        out = sorted({int(i) for i in layers})
        if not out:
            raise ValueError("layers must name at least one aggregator layer, got an empty list")
        bad = [i for i in out if i < 0 or i >= self.depth]
        if bad:
            raise ValueError(f"layers must be in [0, {self.depth - 1}], got {bad}")
        return out

    # ------------------------------------------------------------------ public API
    def iter_layers(self, images: torch.Tensor, layers: Iterable[int] | None = None, *, grad: bool = False,
                    autocast: bool | torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                    check_range: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer_index, patch_tokens)`` for each requested layer, in increasing layer order.

        images:    float [B, S, 3, H, W] or [S, 3, H, W] in [0, 1]; H, W multiples of 14.
        layers:    aggregator layer ids (default: all); duplicates are dropped, order is ascending.
        patch_tokens: [B, S, h*w, 2*embed_dim] = concat(frame_out, global_out) with the special tokens dropped;
                   rows of one frame are row-major over the h x w patch grid. dtype: ``out_dtype`` if given, else
                   the residual stream's dtype (float32 for float32 weights, also under bf16 autocast).
        grad:      run with autograd enabled (default: ``no_grad``).
        autocast:  None -> bf16 autocast on CUDA (when supported), none on CPU; False -> off; a dtype -> that dtype.

        Streaming guarantees: no block after the last requested layer runs; the generator keeps no reference to a
        tensor it has yielded, and only one layer's output exists at a time unless the caller keeps it. The grad and
        autocast modes apply only while the generator computes, never while the caller holds control.
        """
        images = self.check_images(images, check_range=check_range)
        wanted = self._resolve_layers(layers)
        # Validation happens here, at call time; the work starts at the first next().
        return self._iter_impl(images, wanted, grad, autocast, out_dtype)

    def _iter_impl(self, images: torch.Tensor, wanted: list[int], grad: bool, autocast: bool | torch.dtype | None,
                   out_dtype: torch.dtype | None) -> Iterator[tuple[int, torch.Tensor]]:
        with self._contexts(images.device, grad, autocast):
            st = self._start(images)
        del images
        for target in wanted:
            # The yielded tensor is produced by a call and never stored in a local of this generator.
            yield target, self._advance_to(st, target, grad, autocast, out_dtype)
        st.tokens = None  # the residual stream is not needed after the last requested layer

    def _advance_to(self, st: _LayerStream, target: int, grad: bool, autocast: bool | torch.dtype | None,
                    out_dtype: torch.dtype | None) -> torch.Tensor:
        ps = self.patch_start_idx
        with self._contexts(st.tokens.device, grad, autocast):
            while True:
                frame_out, global_out = self._step(st)
                if st.next_layer - 1 == target:
                    break
                del frame_out, global_out
            out = torch.cat([frame_out[:, :, ps:], global_out[:, :, ps:]], dim=-1)
            del frame_out, global_out
            if out_dtype is not None and out.dtype != out_dtype:
                out = out.to(out_dtype)
        return out

    def forward(self, images: torch.Tensor, *, grad: bool = False, autocast: bool | torch.dtype | None = None,
                check_range: bool = True) -> list[torch.Tensor]:
        """Plain reference forward: all ``depth`` layers as a list of [B, S, P, 2*embed_dim] tensors, special tokens
        included (P = patch_start_idx + h*w), as VGGT's own aggregator returns them. Memory-hungry by design."""
        images = self.check_images(images, check_range=check_range)
        outputs: list[torch.Tensor] = []
        with self._contexts(images.device, grad, autocast):
            st = self._start(images)
            for _ in range(self.depth):
                frame_out, global_out = self._step(st)
                outputs.append(torch.cat([frame_out, global_out], dim=-1))
        return outputs

    @classmethod
    def from_pretrained(cls, path: str, config: VGGTAggregatorConfig | None = None, *,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                        frozen: bool = True) -> "VGGTAggregator":
        """Build on the meta device and load the official checkpoint (``model.safetensors`` or ``model.pt``, or a
        directory holding one) from a local path; only the ``aggregator.*`` tensors are read. See
        :func:`geoalign.geometry.load_aggregator_weights`."""
        from .checkpoint import load_aggregator_weights

        with torch.device("meta"):
            model = cls(config, frozen=frozen)
        load_aggregator_weights(model, path, device=device, dtype=dtype, assign=True)
        model.reset_buffers()
        if frozen:
            model.requires_grad_(False)
            model.eval()
        return model


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


__all__: Sequence[str] = ("VGGTAggregator", "count_parameters", "IMAGENET_MEAN", "IMAGENET_STD")
