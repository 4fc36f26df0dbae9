"""Loading the official VGGT checkpoint's aggregator weights from a local path.

facebook/VGGT-1B ships ``model.safetensors`` and ``model.pt``: a flat state dict whose ``aggregator.*`` entries are
the aggregator and whose ``camera_head.*``, ``depth_head.*``, ``point_head.*``, ``track_head.*`` entries are heads we
do not use. Only the aggregator tensors are read (safetensors: lazily, one tensor at a time; ``.pt``: memory-mapped
with ``torch.load(weights_only=True)``). Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Mapping

import torch
from torch import nn

from .config import VGGTAggregatorConfig

logger = logging.getLogger("geoalign.geometry")

AGGREGATOR_PREFIX = "aggregator."
CHECKPOINT_NAMES = ("model.safetensors", "model.pt")
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def official_aggregator_param_shapes(config: VGGTAggregatorConfig | None = None,
                                     prefix: str = AGGREGATOR_PREFIX) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official checkpoint's aggregator tensors, enumerated from the architecture.

    Independent of :class:`VGGTAggregator` on purpose (the tests compare the two). Order: as in the state dict.
    """
    cfg = config if config is not None else VGGTAggregatorConfig()
    out: dict[str, tuple[int, ...]] = {}

    def block(pre: str, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        hidden = int(dim * mlp_ratio)
        out[pre + "norm1.weight"] = (dim,)
        out[pre + "norm1.bias"] = (dim,)
        out[pre + "attn.qkv.weight"] = (3 * dim, dim)
        if cfg.qkv_bias:
            out[pre + "attn.qkv.bias"] = (3 * dim,)
        if qk_norm:
            hd = dim // heads
            out[pre + "attn.q_norm.weight"] = (hd,)
            out[pre + "attn.q_norm.bias"] = (hd,)
            out[pre + "attn.k_norm.weight"] = (hd,)
            out[pre + "attn.k_norm.bias"] = (hd,)
        out[pre + "attn.proj.weight"] = (dim, dim)
        if cfg.proj_bias:
            out[pre + "attn.proj.bias"] = (dim,)
        out[pre + "ls1.gamma"] = (dim,)
        out[pre + "norm2.weight"] = (dim,)
        out[pre + "norm2.bias"] = (dim,)
        out[pre + "mlp.fc1.weight"] = (hidden, dim)
        if cfg.ffn_bias:
            out[pre + "mlp.fc1.bias"] = (hidden,)
        out[pre + "mlp.fc2.weight"] = (dim, hidden)
        if cfg.ffn_bias:
            out[pre + "mlp.fc2.bias"] = (dim,)
        out[pre + "ls2.gamma"] = (dim,)

    d = cfg.patch_embed_dim
    pe = prefix + "patch_embed."
    out[pe + "cls_token"] = (1, 1, d)
    out[pe + "pos_embed"] = (1, 1 + cfg.pos_embed_grid ** 2, d)
    if cfg.num_register_tokens:
        out[pe + "register_tokens"] = (1, cfg.num_register_tokens, d)
    out[pe + "mask_token"] = (1, d)
    out[pe + "patch_embed.proj.weight"] = (d, 3, cfg.patch_size, cfg.patch_size)
    out[pe + "patch_embed.proj.bias"] = (d,)
    for i in range(cfg.patch_embed_depth):
        block(f"{pe}blocks.{i}.", d, cfg.patch_embed_heads, cfg.patch_embed_mlp_ratio, qk_norm=False)
    out[pe + "norm.weight"] = (d,)
    out[pe + "norm.bias"] = (d,)
    for kind in ("frame_blocks", "global_blocks"):
        for i in range(cfg.depth):
            block(f"{prefix}{kind}.{i}.", cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
    out[prefix + "camera_token"] = (1, 2, 1, cfg.embed_dim)
    out[prefix + "register_token"] = (1, 2, cfg.num_register_tokens, cfg.embed_dim)
    return out


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """A checkpoint file: ``path`` itself, or ``model.safetensors`` / ``model.pt`` inside a directory."""
    p = os.fspath(path)
    if os.path.isdir(p):
        for name in CHECKPOINT_NAMES:
            cand = os.path.join(p, name)
            if os.path.isfile(cand):
                return cand
        raise FileNotFoundError(
            f"no VGGT checkpoint in directory {p!r}: expected one of {list(CHECKPOINT_NAMES)}"
        )
    if not os.path.isfile(p):
        raise FileNotFoundError(f"VGGT checkpoint not found: {p!r} (expected a local .safetensors or .pt file)")
    return p


def _group_counts(keys: list[str]) -> str:
    counts = Counter(k.split(".", 1)[0] for k in keys)
    return ", ".join(f"{g}: {n}" for g, n in sorted(counts.items()))


def read_aggregator_state_dict(path: str | os.PathLike, prefix: str = AGGREGATOR_PREFIX,
                               dtype: torch.dtype | None = None,
                               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read the aggregator tensors of a VGGT checkpoint, prefix stripped, as ``{name: tensor}`` on ``device``.

    Accepts a full VGGT state dict (keys ``aggregator.*`` plus head keys, which are skipped and logged) or a bare
    aggregator state dict (no key starts with ``prefix``). Floating tensors are cast to ``dtype`` when given.
    """
    file = resolve_checkpoint_path(path)

    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read safetensors checkpoint {file!r}: {e}") from e
        with handle as f:
            keys = list(f.keys())
            has_prefix = any(k.startswith(prefix) for k in keys)
            take = [k for k in keys if k.startswith(prefix)] if has_prefix else keys
            ignored = [k for k in keys if has_prefix and not k.startswith(prefix)]
            sd = {(k[len(prefix):] if has_prefix else k): convert(f.get_tensor(k)) for k in take}
    elif file.endswith(_PT_SUFFIXES):
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {file!r} with torch.load(weights_only=True): {e}") from e
        for wrapper in ("model", "state_dict"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint {file!r} does not hold a state dict (got {type(obj).__name__})")
        keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        has_prefix = any(k.startswith(prefix) for k in keys)
        ignored = [k for k in keys if has_prefix and not k.startswith(prefix)]
        sd = {(k[len(prefix):] if has_prefix else k): convert(obj[k])
              for k in keys if (k.startswith(prefix) or not has_prefix)}
        del obj
    else:
        raise ValueError(
            f"unsupported checkpoint format {file!r}: expected a .safetensors file or a .pt/.pth/.bin file"
        )
    if ignored:
        logger.info("VGGT checkpoint %s: ignored %d non-aggregator tensors (%s)", file, len(ignored),
                    _group_counts(ignored))
    return sd


def load_aggregator_weights(model: nn.Module, path: str | os.PathLike, *, device: torch.device | str = "cpu",
                            dtype: torch.dtype | None = None, assign: bool = False,
                            prefix: str = AGGREGATOR_PREFIX) -> nn.Module:
    """Load a VGGT checkpoint's aggregator weights into ``model`` (a :class:`VGGTAggregator`), strictly.

    Missing aggregator tensors, unknown ``aggregator.*`` tensors and shape mismatches raise ValueError naming
    the keys with expected vs got shapes; a missing file raises FileNotFoundError. Head tensors are skipped (logged
    at INFO on the ``geoalign.geometry`` logger). ``assign=True`` adopts the loaded tensors (use with a meta-device
    model); otherwise they are copied into the existing parameters. dtype None keeps float32 weights.
    """
    sd = read_aggregator_state_dict(path, prefix=prefix, dtype=dtype if dtype is not None else torch.float32,
                                    device=device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
                  for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing aggregator tensors (expected in the checkpoint, not found): "
                        f"{missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown aggregator tensors (found, not expected by this config): "
                        f"{unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:12]}{' ...' if len(mismatched) > 12 else ''}")
    if problems:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match the aggregator config: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True, assign=assign)
    if not assign:
        model.to(device)
    logger.info("loaded %d aggregator tensors from %s", len(sd), os.fspath(path))
    return model
