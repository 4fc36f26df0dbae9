"""FSDP2 for GeoAlign (``distributed: fsdp``): PyTorch's per-parameter sharding (``torch.distributed.fsdp.fully_shard``).

Units: every decoder layer of the language model is its own unit; the root unit holds the rest of the trainable model
(embeddings, final norm, lm_head and the fusion, whose stream is driven outside ``forward`` and so cannot be a unit
of its own). The frozen encoders (VGGT and Qwen's vision tower, stored in bf16 while the rest is fp32) are left out
of sharding (``ignored_params``): every rank keeps them whole, as DDP and ZeRO-2 do, and no unit mixes dtypes.
``fsdp_sharding``: ``FULL_SHARD`` reshards parameters after forward (ZeRO-3-like), ``SHARD_GRAD_OP`` keeps them
gathered until backward (ZeRO-2-like). With ``precision: bf16`` parameters are all-gathered in bf16 and gradients
reduced in fp32 (``MixedPrecisionPolicy``); the master weights and AdamW states stay fp32 and sharded.

Works on CUDA (NCCL) and on CPU (gloo), so the default tests shard for real with two CPU processes.

Checkpoints: ``torch.distributed.checkpoint`` (each rank writes its own shards of the model and optimizer into
``<checkpoint>/fsdp/``; read back by geoalign.training.safe_loading's reader, which runs no code from the files);
the final model: a full state dict gathered on rank 0 (``full_state_dict``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

SHARDED_DIR = "fsdp"                      # inside a checkpoint directory
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def shard_model(model: nn.Module, *, sharding: str, precision: str) -> nn.Module:
    """Apply ``fully_shard`` in place (decoder layers, then the root, frozen encoders ignored); returns ``model``.
    The model must already be on the device of the process group (CPU for gloo, this rank's GPU for NCCL)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if sharding not in RESHARD_AFTER_FORWARD:
        raise ValueError(f"fsdp_sharding must be one of {sorted(RESHARD_AFTER_FORWARD)}, got {sharding!r}")
    if precision == "fp16":      # accelerate's plain GradScaler cannot unscale sharded (DTensor) gradients
        raise ValueError("distributed: fsdp supports precision bf16 or no; fp16 would need a sharded grad scaler")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    reshard = RESHARD_AFTER_FORWARD[sharding]
    base = model.model
    ignored = {p for m in (base.vggt, base.visual) for p in m.parameters()}
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard, ignored_params=ignored)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers (the FSDP units)."""
    layers = getattr(model.model.language_model, "layers", None)
    if layers is None or not len(layers):
        raise ValueError("FSDP: the language model has no decoder layers (model.model.language_model.layers)")
    return list(layers)


def local_numel(params) -> int:
    """Elements this rank holds of ``params`` (the local shard of a sharded parameter, all of a plain one)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of an accumulation) or keep them local."""
    model.set_requires_gradient_sync(sync)


def to_float(value) -> float:
    """A (possibly DTensor) scalar, e.g. ``clip_grad_norm_``'s total norm over sharded gradients, as a float."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _options(trainable_only: bool, full: bool = False):
    """Sharded (or full, on CPU) state dicts of all parameters or the trainable ones only. Loading a trainable-only
    dict is not strict: the frozen keys are absent by design, and ``dcp.load`` already fails on any requested key
    the checkpoint lacks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable_only,
                            strict=not trainable_only)


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: str, *,
                 trainable_only: bool) -> None:
    """Every rank writes its shards of the model (trainable parameters only, or all) and of AdamW's state into
    ``<checkpoint_dir>/fsdp`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(checkpoint_dir, SHARDED_DIR))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_dir: str, *,
                 trainable_only: bool) -> None:
    """Read what ``save_sharded`` wrote back into the sharded model and optimizer (collective; any world size: DCP
    reshards on load)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .safe_loading import safe_dcp_load

    path = os.path.join(checkpoint_dir, SHARDED_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir!r} has no FSDP shards ({SHARDED_DIR}/): it was not "
                                "written by an FSDP run")
    options = _options(trainable_only)
    msd, osd = get_state_dict(model, optimizer, options=options)
    state = {"model": msd, "optimizer": osd}
    safe_dcp_load(state, path)              # DCP's metadata and items read without running code from them
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered to CPU on rank 0 (empty on the other ranks; collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(trainable_only=False, full=True))
