"""Distributed set-up on Hugging Face accelerate: DDP, DeepSpeed ZeRO-2 (the paper's default) or FSDP2 (fsdp.py),
mixed precision and gradient accumulation. The DeepSpeed config is package data (``deepspeed_zero2.json`` beside this
module), the one source of truth; ``TrainConfig.deepspeed_config`` may name another file.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

import torch

from .config import TrainConfig

DEFAULT_DEEPSPEED_CONFIG = "deepspeed_zero2.json"  # package data of geoalign.training


def deepspeed_config_dict(cfg: TrainConfig, grad_accum: int) -> dict:
    """The DeepSpeed config (``cfg.deepspeed_config``, default the package's ZeRO-2 JSON) with its "auto" fields
    filled as accelerate fills them from the training config."""
    path = cfg.deepspeed_config
    if path is None:
        ds = json.loads(resources.files(__package__).joinpath(DEFAULT_DEEPSPEED_CONFIG).read_text())
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"deepspeed_config not found: {path!r}")
        with open(path) as f:
            ds = json.load(f)
    fill = {"train_micro_batch_size_per_gpu": cfg.per_device_batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": cfg.global_batch_size, "gradient_clipping": cfg.max_grad_norm}
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for key, on in (("bf16", cfg.precision == "bf16"), ("fp16", cfg.precision == "fp16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", "auto") == "auto":
            ds[key]["enabled"] = on
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"the DeepSpeed config must not define '{key}': GeoAlignTrainer builds AdamW with "
                             "per-group learning rates and the cosine schedule itself")
    return ds


def build_accelerator(cfg: TrainConfig, grad_accum: int):
    """accelerate's Accelerator for ``cfg.distributed`` and ``cfg.precision``: DDP, DeepSpeed ZeRO-2, or (FSDP) a plain
    multi-process accelerator whose model the trainer shards itself with FSDP2 (fsdp.py)."""
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError as e:
        raise ImportError("training needs accelerate: pip install accelerate (or pip install 'geoalign[train]')") from e
    kw: dict[str, Any] = dict(mixed_precision=cfg.precision, gradient_accumulation_steps=grad_accum,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=cfg.ddp_find_unused_parameters)])
    if cfg.report_to:
        kw["log_with"] = list(cfg.report_to)
        kw["project_dir"] = os.path.join(cfg.output_dir, "runs")
    deepspeed = cfg.distributed == "deepspeed"
    if deepspeed and not torch.cuda.is_available() and world_size() > 1:
        raise ValueError("distributed='deepspeed' with several processes needs CUDA devices (accelerate runs "
                         "multi-process CPU jobs as DDP only); on CPU use distributed: ddp or fsdp")
    if not torch.cuda.is_available() and not deepspeed:
        kw["cpu"] = True            # accelerate only sets up multi-process CPU (gloo) runs when told cpu=True
    if deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ImportError("distributed='deepspeed' needs deepspeed (pip install deepspeed); or set "
                              "distributed: ddp / fsdp") from e
        from accelerate.utils import DeepSpeedPlugin

        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config_dict(cfg, grad_accum))
    if world_size() == 1:
        # accelerate keeps one process-wide state; a second trainer in the same process (notebooks, tests) with
        # another precision would be refused. Single process only: nothing distributed to tear down.
        from accelerate.state import AcceleratorState

        reset = getattr(AcceleratorState, "_reset_state", None)
        if reset is not None and AcceleratorState._shared_state:
            reset(True)
    return Accelerator(**kw)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_type(accelerator, fsdp: bool) -> str:
    """What the run's engine is, for trainer_state.json and the first log record: "FSDP2", "DEEPSPEED", "DDP"
    (several processes, any device) or "NO" (one process)."""
    if fsdp:
        return "FSDP2"
    kind = accelerator.distributed_type.value
    if kind.startswith("MULTI_"):
        return "DDP"
    return kind
