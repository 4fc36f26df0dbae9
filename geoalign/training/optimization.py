"""What trains and how fast: the parts a train_mode unfreezes, AdamW's parameter groups, the learning-rate schedule.

Frozen always: VGGT and Qwen's vision tower. Trainable: the fusion and the LLM (``train_mode="full"``), the fusion only
(``"frozen_llm"``), or the fusion and LoRA adapters on the LLM (``"lora"``, needs peft). AdamW has four groups,
(fusion | LLM) x (decay | no decay), the fusion's learning rate being ``fusion_learning_rate``; the schedule is a
linear warmup then cosine (or linear) decay to 0, or constant.
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup over ``warmup_steps``, then cosine / linear decay to 0 at ``total_steps`` (or constant)."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def is_fusion_param(name: str) -> bool:
    parts = name.split(".")
    return "fusion" in parts[:3]


def no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or "norm" in name.lower()


def configure_trainable(model, cfg: TrainConfig) -> dict[str, int]:
    """Freeze / unfreeze per ``cfg.train_mode``; returns counts of trainable parameters per part."""
    base = model.model  # GeoAlignModel: visual, language_model, vggt, fusion
    model.requires_grad_(cfg.train_mode == "full")  # the LLM (embeddings, decoder, lm_head) in full mode only
    base.vggt.requires_grad_(False)
    base.visual.requires_grad_(False)
    base.fusion.requires_grad_(True)
    if cfg.train_mode == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:
            raise ImportError("train_mode='lora' needs the optional dependency peft: pip install peft "
                              "(or pip install 'geoalign[train]')") from e
        lm = base.language_model
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none")
        inject_adapter_in_model(lcfg, lm)
        n_lora = 0
        for name, p in lm.named_parameters():
            is_lora = "lora_" in name
            p.requires_grad_(is_lora)
            n_lora += p.numel() if is_lora else 0
        if n_lora == 0:
            raise ValueError(f"LoRA found no modules named {cfg.lora_target_modules} in the language model")
    fusion = sum(p.numel() for p in base.fusion.parameters() if p.requires_grad)
    counts = {"fusion": fusion,
              "qwen": sum(p.numel() for p in model.parameters() if p.requires_grad) - fusion,
              "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    return counts


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with four groups: (fusion | rest) x (decay | no decay); the fusion's lr is ``fusion_learning_rate``."""
    flr = cfg.fusion_learning_rate if cfg.fusion_learning_rate is not None else cfg.learning_rate
    groups: dict[tuple[bool, bool], list] = {(f, d): [] for f in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(is_fusion_param(name), not no_decay(name, p))].append(p)
    param_groups = []
    for (fus, dec), params in groups.items():
        if params:
            param_groups.append({"params": params, "lr": flr if fus else cfg.learning_rate,
                                 "weight_decay": cfg.weight_decay if dec else 0.0,
                                 "name": f"{'fusion' if fus else 'llm'}_{'decay' if dec else 'no_decay'}"})
    if not param_groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def merge_lora_state_dict(state: dict[str, torch.Tensor], scale: float, adapter: str = "default") -> dict:
    """A LoRA model's state dict with every adapter folded into its base weight, under the plain model's names:
    ``<m>.base_layer.weight`` [out, in] + scale * ``<m>.lora_B.<adapter>.weight`` [out, r] @ ``<m>.lora_A.<adapter>.weight``
    [r, in] becomes ``<m>.weight`` (in the base weight's dtype, summed in fp32); ``scale`` = lora_alpha / r."""
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        module, leaf = key.split(".base_layer.", 1)
        if leaf == "weight":
            a, b = state.get(f"{module}.lora_A.{adapter}.weight"), state.get(f"{module}.lora_B.{adapter}.weight")
            if a is None or b is None:
                raise KeyError(f"LoRA module {module!r} has no adapter {adapter!r} (lora_A / lora_B weights)")
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        merged[f"{module}.{leaf}"] = value
    return merged
