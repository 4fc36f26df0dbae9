"""GeoAlignTrainer: supervised fine-tuning of GeoAlign on Hugging Face ``accelerate``.

accelerate supplies the engine (distributed.py): DDP or DeepSpeed ZeRO-2, bf16 mixed precision, gradient
accumulation and ``save_state`` / ``load_state`` (model, optimizer, scheduler, RNG states). FSDP is PyTorch's FSDP2,
applied by the trainer (fsdp.py; accelerate then keeps the RNG states and the schedule). On top of it:

* the data order is a pure function of (seed, epoch, global step, global batch size) (sampler.py), so a resume
  starts exactly where the run stopped;
* the loss is the mean over all supervised tokens of the global batch, however the batch is split over ranks and
  accumulation steps (loss_scaling.py);
* what trains, AdamW's groups and the schedule: optimization.py;
* checkpoints are atomic (checkpoint.py) and by default hold only the trainable parameters.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..atomic_files import DiskFullError, append_jsonl, free_bytes, is_disk_full, write_json
from ..faults import fault_point
from ..memory import peak_memory_bytes
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import GeoAlignCollator, GeoAlignSFTDataset
from . import fsdp
from .distributed import build_accelerator, distributed_type, world_size
from .loss_scaling import backward_scale, supervised_tokens
from .optimization import build_optimizer, configure_trainable, lr_lambda, merge_lora_state_dict
from .safe_loading import check_accelerate_files, deepspeed_weights_only
from .sampler import StepSampler

logger = logging.getLogger("geoalign.training")


@dataclass
class TrainResult:
    global_step: int = 0
    losses: dict[int, float] = field(default_factory=dict)     # step (1-based) -> mean token loss of that step
    last_checkpoint: str | None = None
    final_model_dir: str | None = None
    skipped_records: dict[str, str] = field(default_factory=dict)
    train_time_s: float = 0.0
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> token-mean loss on eval_data


def build_model_and_processor(cfg: TrainConfig):
    from ..modeling import GeoAlignForConditionalGeneration
    from ..processing import GeoAlignProcessor

    cfg.check_paths()
    kw = dict(attn_implementation=cfg.attn_implementation)
    if cfg.model_path:
        model = GeoAlignForConditionalGeneration.from_pretrained(cfg.model_path, geoalign=cfg.fusion_path, **kw)
        proc_src = cfg.model_path
    else:
        if cfg.fusion_config:
            kw["geoalign_config"] = dict(cfg.fusion_config)
        model = GeoAlignForConditionalGeneration.from_pretrained(qwen=cfg.qwen_path, vggt=cfg.vggt_path,
                                                                 geoalign=cfg.fusion_path, **kw)
        proc_src = cfg.qwen_path
    if model.group_size != cfg.group_size:
        raise ValueError(f"the model's fusion has group_size={model.group_size} but the config says "
                         f"group_size={cfg.group_size}")
    processor = GeoAlignProcessor.from_pretrained(proc_src, group_size=cfg.group_size, num_frames=cfg.num_frames)
    return model, processor


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
        self._engine_logged = False

    # ------------------------------------------------------------------ set-up
    def _setup(self):
        cfg = self.cfg
        self._prepare_engine()
        self._prepare_model()
        self._prepare_data()
        self._prepare_optimisation()
        self.start_step = 0
        self.resumed_from = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        if self.resumed_from:
            self._load(self.resumed_from)
        elif cfg.resume_from_checkpoint == "latest" and self.accelerator.is_main_process:
            logger.warning("resume_from_checkpoint='latest': no checkpoint in %s yet, so training starts at step 0",
                           cfg.output_dir)

    def _prepare_engine(self) -> None:
        """The accelerator, the accumulation steps (global batch = per device x processes x accumulation), the seed."""
        cfg = self.cfg
        world = world_size()
        if cfg.global_batch_size % (cfg.per_device_batch_size * world):
            raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by per_device_batch_size="
                             f"{cfg.per_device_batch_size} x {world} processes")
        self.grad_accum = cfg.global_batch_size // (cfg.per_device_batch_size * world)
        self.fsdp = cfg.distributed == "fsdp" and world > 1
        self.accelerator = build_accelerator(cfg, self.grad_accum)
        self.distributed_type = distributed_type(self.accelerator, self.fsdp)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)

    def _prepare_model(self) -> None:
        """Build (or take) the model, freeze per train_mode, store frozen parts in bf16, enable checkpointing."""
        cfg = self.cfg
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

    def _prepare_data(self) -> None:
        """The dataset and collator, and the run's length in optimizer steps."""
        cfg = self.cfg
        if self.train_dataset is None:
            self.train_dataset = GeoAlignSFTDataset.from_files(
                cfg.train_data, self.processor, cfg.media_root, num_frames=cfg.num_frames,
                max_length=cfg.max_length, skip_bad=cfg.skip_bad_records)
        self.collator = GeoAlignCollator.for_processor(self.processor)
        self.eval_dataset = None
        if cfg.eval_data:
            self.eval_dataset = GeoAlignSFTDataset.from_files(
                cfg.eval_data, self.processor, cfg.media_root, num_frames=cfg.num_frames, max_length=cfg.max_length,
                skip_bad=cfg.skip_bad_records)
            if not len(self.eval_dataset):
                raise ValueError(f"eval_data {cfg.eval_data} holds no usable records")
        self.steps_per_epoch = math.ceil(len(self.train_dataset) / cfg.global_batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)

    def _prepare_optimisation(self) -> None:
        """AdamW's groups and the schedule, wrapped by accelerate with the model."""
        cfg, acc = self.cfg, self.accelerator
        if self.fsdp:       # shard first: AdamW must hold the sharded parameters
            fsdp.shard_model(self.model.to(acc.device), sharding=cfg.fsdp_sharding, precision=cfg.precision)
        optimizer = build_optimizer(self.model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_scheduler, self.warmup_steps, self.total_steps))
        if self.fsdp:       # model and AdamW state go to sharded checkpoints (fsdp.py), the schedule to JSON;
            # accelerate keeps the RNG states (it would pickle a scheduler registered with it, and unpickle it with
            # weights_only=False on resume: code from a checkpoint directory someone hands us)
            self.model_ddp, self.optimizer, self.scheduler = self.model, optimizer, scheduler
        else:
            self.model_ddp, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
        self._trainable = {n for n, p in acc.unwrap_model(self.model_ddp).named_parameters() if p.requires_grad}
        if not cfg.save_frozen_weights:
            acc.register_save_state_pre_hook(self._drop_frozen_weights)

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
        if state.get("distributed_type", self.distributed_type) != self.distributed_type and \
                "FSDP2" in (state.get("distributed_type"), self.distributed_type):
            raise ValueError(f"checkpoint {path!r} was written by a {state.get('distributed_type')} run; this run is "
                             f"{self.distributed_type} (FSDP2 checkpoints hold sharded states; the others do not)")
        strict = bool(state.get("saved_frozen_weights", True))
        if not strict and self.distributed_type not in ("DEEPSPEED", "FSDP2"):
            from safetensors import safe_open

            f = os.path.join(path, "model.safetensors")
            with safe_open(f, "pt") as sf:
                keys = {_strip(k) for k in sf.keys()}
            missing = sorted(self._trainable - keys)
            if missing:
                raise ValueError(f"checkpoint {path!r} lacks trainable parameters {missing[:5]} (different train_mode "
                                 "or model?)")
        if self.distributed_type == "DEEPSPEED":
            with deepspeed_weights_only():  # its own checkpoint format (full module states), read weights_only
                acc.load_state(path)
        else:
            check_accelerate_files(path, acc.process_index)   # a refused or damaged file: one error naming it
        if self.distributed_type == "FSDP2":
            acc.load_state(path)            # the RNG states
            fsdp.load_sharded(self.model_ddp, self.optimizer, path, trainable_only=not strict)
            self.scheduler.load_state_dict(ckpt.read_json_state(os.path.join(path, ckpt.SCHEDULER_JSON)))
        elif self.distributed_type != "DEEPSPEED":
            acc.load_state(path, strict=strict)
        self.start_step = int(state["global_step"])
        self.log_history = state.get("log_history", [])
        logger.info("resumed from %s at step %d", path, self.start_step)

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self, step: int, extra: dict | None = None) -> str:
        acc, cfg = self.accelerator, self.cfg
        stage = ckpt.begin(cfg.output_dir, step, acc.is_main_process)
        acc.wait_for_everyone()
        try:
            acc.save_state(stage)
            if self.fsdp:
                fsdp.save_sharded(self.model_ddp, self.optimizer, stage, trainable_only=not cfg.save_frozen_weights)
                if acc.is_main_process:
                    write_json(os.path.join(stage, ckpt.SCHEDULER_JSON), self.scheduler.state_dict())
        except Exception as e:
            if not is_disk_full(e, stage):
                raise
            if acc.is_main_process:                    # the half-written stage is never valid; give its space back
                shutil.rmtree(stage, ignore_errors=True)
            intact = ckpt.latest_checkpoint(cfg.output_dir)
            raise DiskFullError(errno.ENOSPC, f"no space left to write checkpoint {step} into {cfg.output_dir} "
                                f"({free_bytes(cfg.output_dir)} bytes free on its file system): "
                                + (f"{intact} is intact; free some space and run again with --resume latest"
                                   if intact else "no earlier checkpoint exists")) from e
        fault_point("checkpoint-files-written")
        acc.wait_for_everyone()
        path = ckpt.checkpoint_dir(cfg.output_dir, step)
        if acc.is_main_process:
            state = {"global_step": step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                     "global_batch_size": cfg.global_batch_size, "seed": cfg.seed, "world_size": acc.num_processes,
                     "distributed_type": self.distributed_type,
                     "saved_frozen_weights": cfg.save_frozen_weights or self.distributed_type == "DEEPSPEED",
                     "config": cfg.to_dict(),
                     "log_history": self.log_history[-1000:]}
            state.update(extra or {})
            path = ckpt.commit(cfg.output_dir, step, state, cfg.save_total_limit)
        acc.wait_for_everyone()
        return path

    def save_final_model(self) -> str:
        """``<output_dir>/final``: a GeoAlign directory that ``GeoAlignForConditionalGeneration.from_pretrained`` loads,
        whatever the mode: the whole model (LoRA adapters merged into the LLM's weights; FSDP2 shards and ZeRO-2
        partitions gathered on rank 0) and the processor. Floating tensors keep the dtype they trained in (fp32
        masters, bf16 frozen encoders; under DeepSpeed bf16 the engine's module copy, hence bf16) unless
        ``save_dtype`` names one."""
        acc, cfg = self.accelerator, self.cfg
        out = os.path.join(cfg.output_dir, "final")
        model = acc.unwrap_model(self.model_ddp)
        if self.fsdp:
            state = fsdp.full_state_dict(self.model_ddp)              # collective: every rank takes part
        elif self.distributed_type == "DEEPSPEED":
            state = acc.get_state_dict(self.model_ddp)                 # ZeRO-2: full parameters on every rank
        else:
            state = model.state_dict()
        if acc.is_main_process:
            if cfg.train_mode == "lora":
                state = merge_lora_state_dict(state, cfg.lora_alpha / cfg.lora_r)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(cfg.save_dtype)
            state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
                     for k, v in state.items()}
            model.save_pretrained(out, processor=self.processor, state_dict=state)
        acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        self.log_history.append(record)
        if not self.accelerator.is_main_process:
            return
        append_jsonl(os.path.join(self.cfg.output_dir, "train_log.jsonl"), [record])
        if self.cfg.report_to:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        logger.info(msg)
        if self.log_fn is not None:
            self.log_fn(record)

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run to ``total_steps`` (or stop, with a checkpoint, after ``stop_after`` more optimizer steps)."""
        if self.accelerator is None:          # _setup() may have been called already (benchmarks, inspection)
            self._setup()
        cfg = self.cfg
        end = self.total_steps if stop_after is None else min(self.total_steps, self.start_step + stop_after)
        self._announce()
        self._start_trackers()
        batches = iter(self._loader())
        meter = _ThroughputMeter()
        result = TrainResult(global_step=self.start_step)
        bar = self._progress_bar()
        self.model_ddp.train()
        t_start = time.perf_counter()
        step, last_saved = self.start_step, None
        while step < end:
            step_loss, grad_norm = self._optimizer_step([next(batches) for _ in range(self.grad_accum)], meter)
            step += 1
            fault_point("train-step")
            result.losses[step] = step_loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.logging_steps and (step % cfg.logging_steps == 0 or step == end):
                self._log(self._log_record(step, step_loss, grad_norm, meter))
            if self.eval_dataset is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == end):
                result.eval_losses[step] = self.evaluate()
                self._log({"step": step, "eval_loss": result.eval_losses[step]})
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
        result.skipped_records = self._report_skipped()
        if cfg.report_to:
            self.accelerator.end_training()
        return result

    @torch.no_grad()
    def evaluate(self) -> float:
        """The token-mean loss over every record of ``eval_data`` (all ranks together; one record per forward).
        Ranks take records round-robin; a rank with one record fewer runs a last forward it does not count, so that
        every rank makes the same collective calls (FSDP, ZeRO)."""
        from accelerate.utils import send_to_device

        acc, model = self.accelerator, self.model_ddp
        ds, world, rank = self.eval_dataset, acc.num_processes, acc.process_index
        per_rank = math.ceil(len(ds) / world)
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)       # (sum of token losses, tokens)
        try:
            for i in range(per_rank):
                index = i * world + rank
                mb = self.collator([ds[min(index, len(ds) - 1)]])
                mb.pop("ids", None)
                n = supervised_tokens([mb])
                mb = send_to_device(mb, acc.device)
                with acc.autocast():
                    loss = model(**mb, num_items_in_batch=torch.tensor(float(max(n, 1)), device=acc.device)).loss
                if index < len(ds):
                    totals += torch.stack([loss.double() * n, torch.tensor(float(n), device=acc.device)])
        finally:
            model.train(was_training)
        totals = acc.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1].clamp_min(1.0))

    def _start_trackers(self) -> None:
        """accelerate's trackers (``report_to``), with the run's config as their hyper-parameters."""
        if not self.cfg.report_to:
            return
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.cfg.to_dict().items()}
        self.accelerator.init_trackers(os.path.basename(os.path.normpath(self.cfg.output_dir)) or "geoalign",
                                       config=config)

    def _loader(self) -> torch.utils.data.DataLoader:
        """This rank's micro-batches from ``start_step`` on (StepSampler: the resumable data order)."""
        cfg, acc = self.cfg, self.accelerator
        sampler = StepSampler(len(self.train_dataset), global_batch=cfg.global_batch_size,
                              per_device=cfg.per_device_batch_size, world=acc.num_processes, rank=acc.process_index,
                              seed=cfg.seed, start_step=self.start_step, total_steps=self.total_steps)
        return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.collator,
                                           num_workers=cfg.num_workers, pin_memory=acc.device.type == "cuda",
                                           persistent_workers=False)

    def _optimizer_step(self, micro: list[dict], meter: "_ThroughputMeter") -> tuple[float, float | None]:
        """One optimizer step over this rank's accumulation micro-batches; returns (the step's global token-mean loss,
        the pre-clip gradient norm or None)."""
        from accelerate.utils import send_to_device

        acc, cfg, model = self.accelerator, self.cfg, self.model_ddp
        n_global = acc.reduce(torch.tensor(float(supervised_tokens(micro)), device=acc.device), reduction="sum")
        n_global = n_global.clamp_min(1.0)
        loss_sum = torch.zeros((), device=acc.device, dtype=torch.float32)
        grad_norm = None
        for mb in micro:
            mb.pop("ids", None)
            meter.add(mb)
            mb = send_to_device(mb, acc.device)
            with acc.accumulate(model):
                if self.fsdp:      # reduce-scatter in the last micro-batch's backward only
                    fsdp.set_gradient_sync(model, acc.sync_gradients)
                with acc.autocast():
                    loss = model(**mb, num_items_in_batch=n_global).loss
                loss_sum += loss.detach().float()
                acc.backward(loss * backward_scale(acc.num_processes, self.grad_accum))  # see loss_scaling.py
                if acc.sync_gradients:
                    if cfg.max_grad_norm and self.distributed_type != "DEEPSPEED":   # DeepSpeed clips itself
                        grad_norm = fsdp.to_float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                    self.optimizer.step()
                    if self.distributed_type == "DEEPSPEED":        # the engine's pre-clip norm of this step
                        norm = model.get_global_grad_norm()
                        grad_norm = None if norm is None else float(norm)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(loss_sum, reduction="sum")), grad_norm

    def _log_record(self, step: int, loss: float, grad_norm: float | None, meter: "_ThroughputMeter") -> dict:
        acc = self.accelerator
        samples_per_s, tokens_per_s = meter.rates(acc.num_processes)
        rec = {"step": step, "loss": loss}
        rec.update({f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)})
        rec.update({"samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
                         "peak_mem_gb": peak_memory_bytes(acc.device) / 2**30, "epoch": step / self.steps_per_epoch})
        if acc.device.type == "cuda":          # so that the next record's peak is that of its own steps
            torch.cuda.reset_peak_memory_stats(acc.device)
        if not self._engine_logged:            # the first record of this process says what engine ran it
            rec["distributed_type"] = self.distributed_type
            rec["world_size"] = acc.num_processes
            self._engine_logged = True
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        return rec

    def _announce(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            logger.info("training: %d samples, %d steps (%d/epoch), global batch %d = %d per device x %d processes "
                        "x %d accumulation, warmup %d steps, trainable %s, start step %d", len(self.train_dataset),
                        self.total_steps, self.steps_per_epoch, cfg.global_batch_size, cfg.per_device_batch_size,
                        acc.num_processes, self.grad_accum, self.warmup_steps, self.param_counts, self.start_step)

    def _progress_bar(self):
        if not (self.cfg.progress_bar and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True)

    def _report_skipped(self) -> dict:
        skipped = dict(getattr(self.train_dataset, "skipped", {}))
        if skipped and self.accelerator.is_main_process:
            logger.warning("%d bad records were skipped: %s", len(skipped), sorted(skipped)[:20])
        return skipped


class _ThroughputMeter:
    """Samples and (non-padding) tokens seen since the last log record, for samples/s and tokens/s."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0

    def add(self, micro_batch: dict) -> None:
        self.samples += int(micro_batch["input_ids"].shape[0])
        self.tokens += int(micro_batch["attention_mask"].sum())

    def rates(self, world: int) -> tuple[float, float]:
        """(samples/s, tokens/s) over all ranks since the last call (each rank counts its own, equally split)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = (self.samples * world / dt, self.tokens * world / dt)
        self._reset()
        return out


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name
