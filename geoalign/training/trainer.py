"""GeoAlignTrainer: supervised fine-tuning of GeoAlign on Hugging Face ``accelerate``.

accelerate supplies the engine: DDP, DeepSpeed ZeRO-2 or FSDP, bf16 mixed precision, gradient accumulation and
``save_state`` / ``load_state`` (model, optimizer, scheduler, RNG states). On top of it this module adds what the
paper's recipe and exact resumption need:

* the data order is a pure function of (seed, epoch, global step, global batch size): each optimizer step takes the
  next ``global_batch_size`` indices of a seeded per-epoch permutation and splits them over micro-batches and ranks.
  Resuming at step s just starts there: no data is replayed or skipped, and changing the number of GPUs (same global
  batch) keeps the same samples in every step;
* the loss is the mean over all supervised tokens of the global batch (``num_items_in_batch``), so it does not depend
  on how the batch is split over ranks and accumulation steps;
* checkpoints are atomic (:mod:`geoalign.training.checkpoint`) and by default hold only the trainable parameters;
* frozen: VGGT and Qwen's vision tower; trainable: fusion + LLM (``train_mode="full"``), the fusion only
  (``"frozen_llm"``) or fusion + LoRA adapters on the LLM (``"lora"``, needs ``peft``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..atomic_files import append_jsonl, save_safetensors, staged_directory
from ..serialization import write_fusion_files
from . import checkpoint as ckpt
from .config import TrainConfig
from .loss_scaling import backward_scale, supervised_tokens
from .data import GeoAlignCollator, GeoAlignSFTDataset

logger = logging.getLogger("geoalign.training")

DEFAULT_DEEPSPEED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                        "configs", "deepspeed_zero2.json")
DEEPSPEED_ZERO2 = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_partitions": True,
                          "allgather_bucket_size": 5e8},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 1000000000, "wall_clock_breakdown": False,
}


# ----------------------------------------------------------------------------------------------- helpers
def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory so far: CUDA max_memory_allocated on a GPU, else the process's peak RSS (VmHWM)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from ..memory import peak_rss_bytes

    peak = peak_rss_bytes()
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of dataset indices) for optimizer steps ``start_step`` .. ``total``.

    Step s uses indices ``perm_e[(s % S) * GB : (s % S + 1) * GB]`` of epoch e = s // S, where ``perm_e`` is a
    permutation of the dataset seeded with (seed, e), wrapped around to fill the last global batch; micro-batch m
    of rank r takes the slice ``[(m * world + r) * B : (m * world + r + 1) * B]`` of it.
    """

    def __init__(self, n: int, *, global_batch: int, per_device: int, world: int, rank: int, seed: int,
                 start_step: int, total_steps: int, shuffle: bool = True):
        self.n, self.gb, self.b, self.world, self.rank = n, global_batch, per_device, world, rank
        self.seed, self.start, self.total, self.shuffle = seed, start_step, total_steps, shuffle
        self.ga = global_batch // (per_device * world)
        self.steps_per_epoch = math.ceil(n / global_batch)

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            base = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(int(self.seed) * 1000003 + epoch)
            base = torch.randperm(self.n, generator=g).tolist()
        need = self.steps_per_epoch * self.gb
        return (base * (need // self.n + 1))[:need]

    def step_indices(self, step: int) -> list[list[int]]:
        epoch, s = divmod(step, self.steps_per_epoch)
        chunk = self._perm(epoch)[s * self.gb:(s + 1) * self.gb]
        return [chunk[(m * self.world + self.rank) * self.b:(m * self.world + self.rank + 1) * self.b]
                for m in range(self.ga)]

    def __iter__(self) -> Iterator[list[int]]:
        cache: tuple[int, list[int]] | None = None
        for step in range(self.start, self.total):
            epoch, s = divmod(step, self.steps_per_epoch)
            if cache is None or cache[0] != epoch:
                cache = (epoch, self._perm(epoch))
            chunk = cache[1][s * self.gb:(s + 1) * self.gb]
            for m in range(self.ga):
                lo = (m * self.world + self.rank) * self.b
                yield chunk[lo:lo + self.b]

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.ga


@dataclass
class TrainResult:
    global_step: int = 0
    losses: dict[int, float] = field(default_factory=dict)     # step (1-based) -> mean token loss of that step
    last_checkpoint: str | None = None
    final_model_dir: str | None = None
    skipped_records: dict[str, str] = field(default_factory=dict)
    train_time_s: float = 0.0


# ----------------------------------------------------------------------------------------------- model set-up
def build_model_and_processor(cfg: TrainConfig):
    from ..modeling import GeoAlignForConditionalGeneration
    from ..processing import GeoAlignProcessor

    cfg.check_model_source()
    kw = dict(attn_implementation=cfg.attn_implementation)
    if cfg.model_path:
        model = GeoAlignForConditionalGeneration.from_pretrained(cfg.model_path, geoalign=cfg.fusion_path, **kw)
        proc_src = cfg.model_path
    else:
        model = GeoAlignForConditionalGeneration.from_pretrained(qwen=cfg.qwen_path, vggt=cfg.vggt_path,
                                                                 geoalign=cfg.fusion_path, **kw)
        proc_src = cfg.qwen_path
    if model.group_size != cfg.group_size:
        raise ValueError(f"the model's fusion has group_size={model.group_size} but the config says "
                         f"group_size={cfg.group_size}")
    processor = GeoAlignProcessor.from_pretrained(proc_src, group_size=cfg.group_size, num_frames=cfg.num_frames)
    return model, processor


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


def deepspeed_config_dict(cfg: TrainConfig, grad_accum: int) -> dict:
    path = cfg.deepspeed_config
    if path is None and os.path.isfile(DEFAULT_DEEPSPEED_CONFIG):
        path = DEFAULT_DEEPSPEED_CONFIG
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"deepspeed_config not found: {path!r}")
        with open(path) as f:
            ds = json.load(f)
    else:
        ds = json.loads(json.dumps(DEEPSPEED_ZERO2))
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
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError as e:
        raise ImportError("training needs accelerate: pip install accelerate (or pip install 'geoalign[train]')") from e
    kw: dict[str, Any] = dict(mixed_precision=cfg.precision, gradient_accumulation_steps=grad_accum,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=cfg.ddp_find_unused_parameters)])
    if not torch.cuda.is_available():
        kw["cpu"] = True            # accelerate only sets up multi-process CPU (gloo) runs when told cpu=True
    if cfg.distributed == "deepspeed" and _world_size() > 1:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ImportError("distributed='deepspeed' needs deepspeed (pip install deepspeed); or set "
                              "distributed: ddp / fsdp") from e
        from accelerate.utils import DeepSpeedPlugin

        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config_dict(cfg, grad_accum))
    elif cfg.distributed == "fsdp" and _world_size() > 1:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            sharding_strategy=cfg.fsdp_sharding, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Qwen2_5_VLDecoderLayer"], use_orig_params=True,
            state_dict_type="SHARDED_STATE_DICT", activation_checkpointing=False)
    if _world_size() == 1:
        # accelerate keeps one process-wide state; a second trainer in the same process (notebooks, tests) with
        # another precision would be refused. Single process only: nothing distributed to tear down.
        from accelerate.state import AcceleratorState

        reset = getattr(AcceleratorState, "_reset_state", None)
        if reset is not None and AcceleratorState._shared_state:
            reset(True)
    return Accelerator(**kw)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------------------- trainer
class GeoAlignTrainer:
    """``GeoAlignTrainer(cfg).train()`` builds everything from the config; tests and notebooks may pass ``model``,
    ``processor`` and / or ``train_dataset`` directly."""

    def __init__(self, config: TrainConfig, *, model=None, processor=None,
                 train_dataset: GeoAlignSFTDataset | None = None, log_fn=None):
        self.cfg = config
        self.model = model
        self.processor = processor
        self.train_dataset = train_dataset
        self.log_fn = log_fn
        self.accelerator = None
        self.log_history: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _setup(self):
        cfg = self.cfg
        world = _world_size()
        if cfg.global_batch_size % (cfg.per_device_batch_size * world):
            raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by per_device_batch_size="
                             f"{cfg.per_device_batch_size} x {world} processes")
        self.grad_accum = cfg.global_batch_size // (cfg.per_device_batch_size * world)
        acc = self.accelerator = build_accelerator(cfg, self.grad_accum)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        if self.model is None:
            self.model, self.processor = build_model_and_processor(cfg)
        elif self.processor is None:
            raise ValueError("pass processor= along with model=")
        model = self.model
        self.param_counts = configure_trainable(model, cfg)
        if cfg.precision == "bf16" and cfg.cast_frozen_to_bf16:
            model.model.vggt.to(torch.bfloat16)
            model.model.visual.to(torch.bfloat16)
        if cfg.fusion_backend:
            model.fusion.config.backend = cfg.fusion_backend
        if cfg.gradient_checkpointing:
            # non-reentrant checkpointing: correct with frozen embeddings / frozen LLM (no input-grad hooks needed)
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):      # newer transformers 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:                                                      # e.g. transformers 5.17
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
        if self.train_dataset is None:
            self.train_dataset = GeoAlignSFTDataset.from_files(
                cfg.train_data, self.processor, cfg.media_root, num_frames=cfg.num_frames,
                max_length=cfg.max_length, skip_bad=cfg.skip_bad_records)
        self.collator = GeoAlignCollator.for_processor(self.processor)
        n = len(self.train_dataset)
        self.steps_per_epoch = math.ceil(n / cfg.global_batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_scheduler, self.warmup_steps, self.total_steps))
        self.model_ddp, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self._trainable = {n for n, p in acc.unwrap_model(self.model_ddp).named_parameters() if p.requires_grad}
        if not cfg.save_frozen_weights:
            acc.register_save_state_pre_hook(self._drop_frozen_weights)
        self.start_step = 0
        self.resumed_from = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        if self.resumed_from:
            self._load(self.resumed_from)

    def _drop_frozen_weights(self, models, weights, output_dir):
        for i, sd in enumerate(weights):
            weights[i] = type(sd)((k, v) for k, v in sd.items() if _strip(k) in self._trainable)

    def _load(self, path: str):
        acc, cfg = self.accelerator, self.cfg
        state = ckpt.read_state(path)
        if state.get("global_batch_size") != cfg.global_batch_size or state.get("seed") != cfg.seed:
            raise ValueError(f"checkpoint {path!r} was written with global_batch_size={state.get('global_batch_size')}"
                             f", seed={state.get('seed')}; this run has {cfg.global_batch_size}, {cfg.seed}: the "
                             "data order would differ")
        if state.get("world_size") != acc.num_processes:
            logger.warning("resuming a %s-process checkpoint on %s processes: same data order, but per-rank RNG "
                           "states cannot be restored exactly", state.get("world_size"), acc.num_processes)
        if state.get("total_steps") != self.total_steps:
            raise ValueError(f"checkpoint {path!r} belongs to a run of {state.get('total_steps')} steps; this config "
                             f"gives {self.total_steps} (the schedule would differ)")
        strict = bool(state.get("saved_frozen_weights", True))
        if not strict and acc.distributed_type.value not in ("DEEPSPEED", "FSDP"):
            from safetensors import safe_open

            f = os.path.join(path, "model.safetensors")
            with safe_open(f, "pt") as sf:
                keys = {_strip(k) for k in sf.keys()}
            missing = sorted(self._trainable - keys)
            if missing:
                raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:5]} (different train_mode "
                                 "or model?)")
        if acc.distributed_type.value in ("DEEPSPEED", "FSDP"):
            acc.load_state(path)            # their own checkpoint formats (full module states)
        else:
            acc.load_state(path, strict=strict)
        self.start_step = int(state["global_step"])
        self.log_history = state.get("log_history", [])
        logger.info("resumed from %s at step %d", path, self.start_step)

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self, step: int, extra: dict | None = None) -> str:
        acc, cfg = self.accelerator, self.cfg
        stage = ckpt.begin(cfg.output_dir, step, acc.is_main_process)
        acc.wait_for_everyone()
        acc.save_state(stage)
        acc.wait_for_everyone()
        path = ckpt.checkpoint_dir(cfg.output_dir, step)
        if acc.is_main_process:
            state = {"global_step": step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                     "global_batch_size": cfg.global_batch_size, "seed": cfg.seed, "world_size": acc.num_processes,
                     "saved_frozen_weights": cfg.save_frozen_weights or
                     acc.distributed_type.value in ("DEEPSPEED", "FSDP"), "config": cfg.to_dict(),
                     "log_history": self.log_history[-1000:]}
            state.update(extra or {})
            path = ckpt.commit(cfg.output_dir, step, state, cfg.save_total_limit)
        acc.wait_for_everyone()
        return path

    def save_final_model(self) -> str:
        acc = self.accelerator
        out = os.path.join(self.cfg.output_dir, "final")
        if acc.distributed_type.value == "FSDP":
            sd = acc.get_state_dict(self.model_ddp)
            if acc.is_main_process:
                with staged_directory(out, "trainable.safetensors") as stage:
                    save_safetensors(os.path.join(stage, "trainable.safetensors"),
                                     {k: v.contiguous().cpu() for k, v in sd.items() if _strip(k) in self._trainable})
        elif acc.is_main_process:
            model = acc.unwrap_model(self.model_ddp)
            if self.cfg.train_mode == "lora":
                with staged_directory(out, "lora.safetensors") as stage:
                    write_fusion_files(model.fusion, stage)
                    save_safetensors(os.path.join(stage, "lora.safetensors"),
                                     {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                                      if "lora_" in k})
            else:
                model.save_pretrained(out, processor=self.processor)
        acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        self.log_history.append(record)
        if not self.accelerator.is_main_process:
            return
        append_jsonl(os.path.join(self.cfg.output_dir, "train_log.jsonl"), [record])
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        logger.info(msg)
        if self.log_fn is not None:
            self.log_fn(record)

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run to ``total_steps`` (or stop, with a checkpoint, after ``stop_after`` more optimizer steps)."""
        if self.accelerator is None:          # _setup() may have been called already (benchmarks, inspection)
            self._setup()
        acc, cfg = self.accelerator, self.cfg
        model = self.model_ddp
        world, rank = acc.num_processes, acc.process_index
        sampler = StepSampler(len(self.train_dataset), global_batch=cfg.global_batch_size,
                              per_device=cfg.per_device_batch_size, world=world, rank=rank, seed=cfg.seed,
                              start_step=self.start_step, total_steps=self.total_steps)
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.collator,
                                             num_workers=cfg.num_workers, pin_memory=acc.device.type == "cuda",
                                             persistent_workers=False)
        result = TrainResult(global_step=self.start_step)
        end = self.total_steps if stop_after is None else min(self.total_steps, self.start_step + stop_after)
        if acc.is_main_process:
            logger.info("training: %d samples, %d steps (%d/epoch), global batch %d = %d per device x %d processes "
                        "x %d accumulation, warmup %d steps, trainable %s, start step %d", len(self.train_dataset),
                        self.total_steps, self.steps_per_epoch, cfg.global_batch_size, cfg.per_device_batch_size,
                        world, self.grad_accum, self.warmup_steps, self.param_counts, self.start_step)
        bar = None
        if cfg.progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True)
        model.train()
        it = iter(loader)
        t_start = time.perf_counter()
        t_log, samples_log, tokens_log = time.perf_counter(), 0, 0
        step = self.start_step
        last_saved = None
        while step < end:
            micro = [next(it) for _ in range(self.grad_accum)]
            n_local = supervised_tokens(micro)
            n_global = acc.reduce(torch.tensor(float(n_local), device=acc.device), reduction="sum")
            n_global = n_global.clamp_min(1.0)
            loss_sum = torch.zeros((), device=acc.device, dtype=torch.float32)
            for mb in micro:
                mb.pop("ids", None)
                samples_log += mb["input_ids"].shape[0]
                tokens_log += int(mb["attention_mask"].sum())
                with acc.accumulate(model):
                    out = model(**mb, num_items_in_batch=n_global)
                    loss = out.loss
                    loss_sum += loss.detach().float()
                    acc.backward(loss * backward_scale(world, self.grad_accum))  # see loss_scaling.py
                    grad_norm = None
                    if acc.sync_gradients:
                        if cfg.max_grad_norm and acc.distributed_type.value != "DEEPSPEED":
                            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(acc.reduce(loss_sum, reduction="sum"))
            result.losses[step] = step_loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.logging_steps and (step % cfg.logging_steps == 0 or step == end):
                dt = time.perf_counter() - t_log
                rec = {"step": step, "loss": step_loss, "lr": float(self.scheduler.get_last_lr()[0]),
                       "fusion_lr": _group_lr(self.optimizer),
                       "samples_per_s": samples_log * world / max(dt, 1e-9),
                       "tokens_per_s": tokens_log * world / max(dt, 1e-9),
                       "peak_mem_gb": peak_memory_bytes(acc.device) / 2**30, "epoch": step / self.steps_per_epoch}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                self._log(rec)
                t_log, samples_log, tokens_log = time.perf_counter(), 0, 0
            if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
                result.last_checkpoint = last_saved = self.save_checkpoint(step)
        result.global_step = step
        if last_saved != ckpt.checkpoint_dir(cfg.output_dir, step) and step > self.start_step:
            result.last_checkpoint = self.save_checkpoint(step)      # the end of the run, or where it stopped
        if step >= self.total_steps and cfg.save_final_model:
            result.final_model_dir = self.save_final_model()
        if bar is not None:
            bar.close()
        result.train_time_s = time.perf_counter() - t_start
        result.skipped_records = dict(getattr(self.train_dataset, "skipped", {}))
        if result.skipped_records and acc.is_main_process:
            logger.warning("%d bad records were skipped: %s", len(result.skipped_records),
                           sorted(result.skipped_records)[:20])
        return result


def _group_lr(optimizer) -> float:
    for g in optimizer.param_groups:
        if str(g.get("name", "")).startswith("fusion"):
            return float(g["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name
