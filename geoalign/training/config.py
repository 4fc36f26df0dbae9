"""TrainConfig: every hyper-parameter of a GeoAlign training run; the defaults are the paper's (Section 5.1).

Paper: Qwen2.5-VL-3B + VGGT-1B (frozen) + the fusion, one epoch, AdamW, global batch 64, learning rate 1e-5 for
everything, cosine decay with a linear warmup over the first 3% of steps, bf16, DeepSpeed ZeRO-2, 8 GPUs. Values
the paper does not give (weight decay, gradient clipping, AdamW betas/eps, frames per sample) use common defaults
and are marked "not in the paper" below.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..atomic_files import write_json
from ..backends import ALL_BACKENDS

PRECISIONS = ("bf16", "fp16", "no")
DISTRIBUTED = ("ddp", "deepspeed", "fsdp")
TRAIN_MODES = ("full", "frozen_llm", "lora")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP")
SAVE_DTYPES = ("bf16", "fp16", "fp32")
TRACKERS = ("tensorboard", "wandb")
FLOAT_KEYS = ("lora_dropout", "num_train_epochs", "learning_rate", "fusion_learning_rate", "weight_decay",
              "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "warmup_ratio")


@dataclass
class TrainConfig:
    """One training run. Load from YAML with :meth:`from_yaml`; unknown keys are an error.

    Model
      model_path            a saved GeoAlign directory (``save_pretrained``); or give qwen_path + vggt_path
      qwen_path, vggt_path  base checkpoints (local); fusion_path: optional trained fusion (``save_fusion``)
      fusion_config         with qwen_path + vggt_path and no fusion_path: GeoAlignConfig overrides of the paper's
                            fusion for a fresh one, e.g. {fusion: gated_2d3d, gate_granularity: token} (GAP-MLLM)
      group_size            G: 4 = frames as images (VG-LLM), 8 = Qwen's video path
      fusion_backend        "auto" (Triton on CUDA, else the sparse torch backend), "torch", "triton", "reference"
      attn_implementation   Qwen's attention ("sdpa", "flash_attention_2", ...); None = transformers' default
      train_mode            "full" (fusion + LLM trainable; paper), "frozen_llm" (fusion only), "lora" (fusion + LoRA)
      lora_r/alpha/dropout/target_modules  LoRA on the LLM's linear layers (needs ``peft``)
    Data
      train_data            LLaVA-style JSON / JSONL file(s); media_root: root for relative media paths
      num_frames            frames sampled per video / image folder (not in the paper; VG-LLM uses 16-32)
      max_length            drop (skip_bad_records) or reject samples whose token count exceeds this (0 = no limit)
      skip_bad_records      skip and count malformed records / missing media instead of failing (off)
    Optimisation
      num_train_epochs 1, global_batch_size 64, per_device_batch_size 1 (gradient accumulation is derived),
      learning_rate 1e-5, fusion_learning_rate None (= learning_rate: the paper uses one uniform rate),
      weight_decay 0.0, adam_beta1 0.9, adam_beta2 0.999, adam_epsilon 1e-8, max_grad_norm 1.0 (not in the paper),
      lr_scheduler "cosine", warmup_ratio 0.03, max_steps 0 (0 = from epochs)
    Engine
      precision "bf16" (accelerate mixed precision; with DeepSpeed its bf16 mode), distributed "deepspeed" / "ddp" /
      "fsdp" (FSDP2; fsdp_sharding "FULL_SHARD" or "SHARD_GRAD_OP"), deepspeed_config (default: the package data
      geoalign/training/deepspeed_zero2.json), gradient_checkpointing True,
      cast_frozen_to_bf16 True (frozen VGGT + Qwen vision tower held in bf16 when precision is bf16)
    Evaluation
      eval_data             optional held-out JSON/JSONL files (same media_root); their token-mean loss is logged as
                            eval_loss every eval_steps optimizer steps (0 = only at the end)
    Checkpoints / logs
      output_dir, save_steps 500 (0 = only at the end), save_total_limit 2, resume_from_checkpoint
      (None, "latest" or a checkpoint directory), save_frozen_weights False (checkpoints hold only the trainable
      parameters), save_final_model True (``output_dir/final``, loadable with from_pretrained in every mode),
      save_dtype None (final weights in the dtype each trained in; or "bf16" / "fp16" / "fp32"), logging_steps 10,
      report_to [] ("tensorboard", "wandb": accelerate's trackers, under output_dir/runs), seed 42,
      num_workers 2, progress_bar True
    """

    # model
    model_path: str | None = None
    qwen_path: str | None = None
    vggt_path: str | None = None
    fusion_path: str | None = None
    fusion_config: dict[str, Any] | None = None
    group_size: int = 4
    fusion_backend: str | None = "auto"
    attn_implementation: str | None = None
    train_mode: str = "full"
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # data
    train_data: list[str] = field(default_factory=list)
    media_root: str | None = None
    num_frames: int | None = 32
    max_length: int = 0
    skip_bad_records: bool = False
    eval_data: list[str] = field(default_factory=list)
    eval_steps: int = 0
    # optimisation
    num_train_epochs: float = 1.0
    max_steps: int = 0
    global_batch_size: int = 64
    per_device_batch_size: int = 1
    learning_rate: float = 1e-5
    fusion_learning_rate: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    # engine
    precision: str = "bf16"
    distributed: str = "deepspeed"
    deepspeed_config: str | None = None
    fsdp_sharding: str = "FULL_SHARD"
    gradient_checkpointing: bool = True
    cast_frozen_to_bf16: bool = True
    ddp_find_unused_parameters: bool = True
    # checkpoints / logging
    output_dir: str = "outputs/geoalign"
    save_steps: int = 500
    save_total_limit: int | None = 2
    save_frozen_weights: bool = False
    resume_from_checkpoint: str | None = None
    save_final_model: bool = True
    save_dtype: str | None = None
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=list)
    seed: int = 42
    num_workers: int = 2
    progress_bar: bool = True

    def __post_init__(self) -> None:
        # YAML 1.1 (PyYAML) reads "1e-5" (no dot) as a string: accept numeric strings for numeric keys
        for key in FLOAT_KEYS:
            v = getattr(self, key)
            if isinstance(v, str):
                try:
                    setattr(self, key, float(v))
                except ValueError:
                    raise ValueError(f"TrainConfig.{key}: expected a number, got {v!r}") from None
        if isinstance(self.train_data, (str, os.PathLike)):
            self.train_data = [os.fspath(self.train_data)]
        self.train_data = [os.fspath(p) for p in self.train_data]
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [os.fspath(self.eval_data)]
        self.eval_data = [os.fspath(p) for p in self.eval_data]
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.validate()

    def validate(self) -> None:
        def bad(key, msg):
            raise ValueError(f"TrainConfig.{key}: {msg}, got {getattr(self, key)!r}")

        if self.group_size not in (4, 8):
            bad("group_size", "must be 4 (frames as images) or 8 (video path)")
        if self.train_mode not in TRAIN_MODES:
            bad("train_mode", f"must be one of {TRAIN_MODES}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {PRECISIONS}")
        if self.distributed not in DISTRIBUTED:
            bad("distributed", f"must be one of {DISTRIBUTED}")
        if self.fusion_config is not None and not isinstance(self.fusion_config, dict):
            bad("fusion_config", "must be a mapping of GeoAlignConfig fields to values, or null")
        if self.fusion_backend is not None and self.fusion_backend not in ("auto",) + ALL_BACKENDS:
            bad("fusion_backend", f"must be 'auto' or one of {ALL_BACKENDS}")
        if self.fsdp_sharding not in FSDP_SHARDING:
            bad("fsdp_sharding", f"must be one of {FSDP_SHARDING}")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            bad("save_dtype", f"must be one of {SAVE_DTYPES} or null")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            bad("report_to", f"trackers must be among {TRACKERS}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            bad("lr_scheduler", "must be 'cosine', 'linear' or 'constant'")
        for key in ("global_batch_size", "per_device_batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive int")
        if self.global_batch_size % self.per_device_batch_size:
            bad("global_batch_size", f"must be a multiple of per_device_batch_size={self.per_device_batch_size}")
        for key in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "num_train_epochs"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                bad(key, "must be a number >= 0")
        if self.fusion_learning_rate is not None and self.fusion_learning_rate < 0:
            bad("fusion_learning_rate", "must be >= 0 or null")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.num_frames is not None and self.num_frames < 1:
            bad("num_frames", "must be >= 1 or null (all frames)")
        if self.max_steps < 0 or self.save_steps < 0 or self.logging_steps < 0 or self.eval_steps < 0:
            raise ValueError("TrainConfig: max_steps, save_steps, logging_steps and eval_steps must be >= 0")

    def check_paths(self) -> None:
        """Every path the run reads or writes, before anything loads: the model source (set, and present on this
        machine: only local files are read), the data files, a checkpoint to resume from, and output_dir (not a
        file). Raises FileNotFoundError / ValueError naming the key and the path."""
        if self.model_path is None and (self.qwen_path is None or self.vggt_path is None):
            raise ValueError("TrainConfig: set model_path (a saved GeoAlign directory) or both qwen_path and vggt_path")
        for key in ("model_path", "qwen_path", "vggt_path", "fusion_path"):
            path = getattr(self, key)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"TrainConfig.{key}: not found: {path!r} (geoalign reads local files only "
                                        "and downloads nothing; give the path of a local copy)")
        if self.fusion_config and (self.model_path is not None or self.fusion_path is not None):
            raise ValueError("TrainConfig.fusion_config builds a fresh fusion from qwen_path + vggt_path; it cannot "
                             "change the fusion of model_path or fusion_path")
        if not self.train_data:
            raise ValueError("TrainConfig.train_data: give at least one JSON/JSONL file")
        for key in ("train_data", "eval_data"):
            for path in getattr(self, key):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"TrainConfig.{key}: training data file not found: {path!r}")
        if self.output_dir and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"TrainConfig.output_dir: {self.output_dir!r} is an existing file, not a directory")
        if self.resume_from_checkpoint not in (None, "", "latest"):
            from .checkpoint import resolve_resume

            resolve_resume(self.resume_from_checkpoint, self.output_dir)

    def optional_modules(self) -> list[tuple[str, str, str]]:
        """(module, geoalign extra that installs it, what needs it) for the optional packages this config uses."""
        need = []
        if self.distributed == "deepspeed":
            need.append(("deepspeed", "deepspeed", "distributed: deepspeed (or set distributed: ddp / fsdp)"))
        if self.train_mode == "lora":
            need.append(("peft", "train", "train_mode: lora"))
        if "tensorboard" in self.report_to:
            need.append(("tensorboard", "train", "report_to: tensorboard"))
        if "wandb" in self.report_to:
            need.append(("wandb", "wandb", "report_to: wandb"))
        return need

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        import yaml

        p = os.fspath(path)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"training config not found: {p!r}")
        with open(p) as f:
            try:
                d = yaml.safe_load(f) or {}           # plain data only: a !!python tag is refused, never run
            except yaml.YAMLError as e:
                raise ValueError(f"training config {p!r} is not plain YAML data: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(d, dict):
            raise ValueError(f"training config {p!r} must be a YAML mapping of keys to values")
        d.update(overrides or {})
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())
