"""Transformer pieces of the VGGT aggregator and its DINOv2 backbone.

Written for geoalign from VGGT's published architecture. Module and parameter names follow the official checkpoint
(`attn.qkv`, `attn.q_norm`, `ls1.gamma`, `mlp.fc1`, ...), so its state dict loads without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel residual scale: x * gamma, gamma [dim] initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Rope2D:
    """2D rotary tables for one frame's tokens, applied to q/k of shape [B', heads, n·P, head_dim].

    The head dim is split in two halves: the first rotates with the row (y) position, the second with the column (x)
    position. Inside each half, channel j and j + half/2 form a rotation pair with inverse frequency
    ``freq ** (-2j / half)`` (rotate-half convention). ``cos``/``sin`` are [P, head_dim] float32; a sequence of n
    frames (global attention) reuses the same P-row tables for each frame.
    """

    def __init__(self, positions: torch.Tensor, head_dim: int, freq: float) -> None:
        """positions: [P, 2] int64 (y, x) per token of one frame."""
        if head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        exponents = torch.arange(0, half, 2, device=positions.device, dtype=torch.float32) / half
        inv_freq = 1.0 / (float(freq) ** exponents)                       # [half/2]
        ang = positions.to(torch.float32)[:, :, None] * inv_freq           # [P, 2, half/2]
        ang = torch.cat([ang, ang], dim=-1).reshape(positions.shape[0], head_dim)  # [P, (y|x) x half]
        self.cos = ang.cos()
        self.sin = ang.sin()
        self.num_tokens = positions.shape[0]

    @staticmethod
    def _rotate(x: torch.Tensor) -> torch.Tensor:
        q = x.unflatten(-1, (2, 2, x.shape[-1] // 4))                     # [..., axis, pair-half, quarter]
        return torch.stack((-q[..., 1, :], q[..., 0, :]), dim=-2).flatten(-3)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B', heads, N, head_dim] with N a multiple of P; returns the rotated tensor, same shape and dtype."""
        n = x.shape[-2]
        p = self.num_tokens
        cos = self.cos.to(x.dtype)
        sin = self.sin.to(x.dtype)
        if n == p:
            return x * cos + self._rotate(x) * sin
        if n % p != 0:
            raise ValueError(f"RoPE: sequence length {n} is not a multiple of the frame length {p}")
        xf = x.unflatten(-2, (n // p, p))
        return (xf * cos + self._rotate(xf) * sin).flatten(-3, -2)


def grid_positions(h: int, w: int, num_special: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[num_special + h*w, 2] int64 (y, x): special tokens at (0, 0), patch (r, c) at (r + 1, c + 1), row-major."""
    ys = torch.arange(h, device=device, dtype=torch.int64).repeat_interleave(w)
    xs = torch.arange(w, device=device, dtype=torch.int64).repeat(h)
    patch = torch.stack([ys, xs], dim=-1) + 1
    special = torch.zeros(num_special, 2, dtype=torch.int64, device=device)
    return torch.cat([special, patch], dim=0)


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; optional per-head q/k LayerNorm and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # q/k norms use LayerNorm's default eps (1e-5), as in VGGT; DINOv2 blocks have none.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                           # each [B, heads, N, head_dim]
        del qkv
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if rope is not None:
            q = rope.apply(q)
            k = rope.apply(k)
        out = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 init_values: float | None = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: [N, 3, H, W] -> [N, (H/p)*(W/p), dim], row-major over patches."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2Backbone(nn.Module):
    """DINOv2 ViT with register tokens, as VGGT builds it (LayerScale, LayerNorm eps 1e-6, no q/k norm, unchunked).

    Parameter names: ``cls_token [1,1,D]``, ``pos_embed [1,1+M*M,D]``, ``register_tokens [1,R,D]``,
    ``mask_token [1,D]`` (unused at inference, kept for checkpoint compatibility), ``patch_embed.proj``,
    ``blocks.{i}``, ``norm``.
    """

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 num_register_tokens: int, init_values: float, interpolate_antialias: bool = True,
                 interpolate_offset: float = 0.0, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim)) if num_register_tokens else None
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  qk_norm=False, init_values=init_values, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolated_pos_embed(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embedding for an h x w patch grid: [1, 1 + h*w, D] (bicubic, anti-aliased, in float32)."""
        m = self.grid
        if h == m and w == m:
            return self.pos_embed.to(dtype)
        pe = self.pos_embed.float()
        cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
        d = pe.shape[-1]
        grid = patch_pe.reshape(1, m, m, d).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / m, (w + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=self.interpolate_antialias)
        if tuple(grid.shape[-2:]) != (h, w):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
        patch_pe = grid.permute(0, 2, 3, 1).reshape(1, h * w, d)
        return torch.cat([cls_pe, patch_pe], dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] normalised images -> final-normed patch tokens [N, (H/p)*(W/p), D]."""
        n, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1)
        t = t + self.interpolated_pos_embed(h, w, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(n, -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t[:, 1 + self.num_register_tokens:]


def _num_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
