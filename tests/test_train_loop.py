"""Training loop on CPU with the tiny random model: the loss falls, resume matches an uninterrupted run, atomic
checkpoints, LoRA / frozen-LLM modes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from geoalign.tiny import tiny_model  # noqa: E402

pytest.importorskip("accelerate")

from geoalign.processing import GeoAlignProcessor  # noqa: E402
from geoalign.training import checkpoint as ckpt  # noqa: E402
from geoalign.training.config import TrainConfig  # noqa: E402
from geoalign.training.synthetic import make_colour_dataset  # noqa: E402
from geoalign.training.trainer import GeoAlignTrainer, StepSampler  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: oversubscribed intra-op threads make tiny matmuls 30x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    path = make_colour_dataset(root, 8, frame_counts=(1, 2), height=8)
    return path, root


def _cfg(data, out, **kw):
    path, root = data
    base = dict(train_data=[path], media_root=root, output_dir=str(out), precision="no", distributed="ddp",
                global_batch_size=2, per_device_batch_size=1, learning_rate=3e-3, num_workers=0, logging_steps=0,
                save_steps=0, progress_bar=False, num_frames=4, save_final_model=False)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg, seed=0, perturb=False):
    model, tok = tiny_model(seed=seed)
    if perturb:                       # different trainable weights: a resume must overwrite them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("model.vggt.") and ".visual." not in name:
                    p.add_(torch.randn_like(p) * 0.1)
    proc = GeoAlignProcessor(tok, None, group_size=4, num_frames=cfg.num_frames)
    return GeoAlignTrainer(cfg, model=model, processor=proc)


def test_loss_decreases(data, tmp_path):
    cfg = _cfg(data, tmp_path, max_steps=24, save_final_model=True, logging_steps=8)
    res = _trainer(cfg).train()
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, losses
    assert res.last_checkpoint == ckpt.checkpoint_dir(str(tmp_path), 24) and ckpt.is_valid_checkpoint(res.last_checkpoint)
    # frozen parts are not in the checkpoint; the exported model loads back
    from safetensors import safe_open

    with safe_open(os.path.join(res.last_checkpoint, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("model.vggt.") or ".visual." in k for k in keys)
    assert any(k.startswith("model.fusion.") for k in keys)
    from geoalign.modeling import GeoAlignForConditionalGeneration

    m = GeoAlignForConditionalGeneration.from_pretrained(res.final_model_dir)
    assert m.fusion.config.group_size == 4
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == [8, 16, 24]
    assert {"loss", "lr", "samples_per_s", "tokens_per_s", "peak_mem_gb"} <= set(log[0])


def test_resume_matches_uninterrupted(data, tmp_path):
    full = _trainer(_cfg(data, tmp_path / "a", max_steps=8)).train()
    part = _trainer(_cfg(data, tmp_path / "b", max_steps=8)).train(stop_after=4)
    assert part.global_step == 4 and part.last_checkpoint.endswith("checkpoint-4")
    resumed = _trainer(_cfg(data, tmp_path / "b", max_steps=8, resume_from_checkpoint="latest"),
                       perturb=True).train()
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for s in range(1, 5):
        assert part.losses[s] == full.losses[s]
    for s in range(5, 9):
        assert resumed.losses[s] == pytest.approx(full.losses[s], rel=1e-6, abs=1e-7), (s, resumed.losses, full.losses)


def test_staging_checkpoint_is_ignored(data, tmp_path):
    # a crash mid-save leaves a staging directory (and maybe a half-written checkpoint without its state file)
    os.makedirs(tmp_path / ".staging-checkpoint-6")
    (tmp_path / ".staging-checkpoint-6" / "model.safetensors").write_bytes(b"garbage")
    os.makedirs(tmp_path / "checkpoint-9")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    assert ckpt.resolve_resume("latest", str(tmp_path)) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-9"), str(tmp_path))
    res = _trainer(_cfg(data, tmp_path, max_steps=2, save_steps=1, save_total_limit=1)).train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    assert not (tmp_path / ".staging-checkpoint-6").exists()
    assert res.last_checkpoint.endswith("checkpoint-2")


def test_resume_rejects_other_batch_size(data, tmp_path):
    _trainer(_cfg(data, tmp_path, max_steps=4)).train(stop_after=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        _trainer(_cfg(data, tmp_path, max_steps=4, global_batch_size=4, resume_from_checkpoint="latest")).train()


@pytest.mark.parametrize("mode", ["frozen_llm", "lora"])
def test_train_modes(data, tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    t = _trainer(_cfg(data, tmp_path, max_steps=2, train_mode=mode, fusion_learning_rate=1e-2, lora_r=4,
                      lora_alpha=8))
    res = t.train()
    m = t.accelerator.unwrap_model(t.model_ddp)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.fusion.") for n in trainable)
    assert not any(n.startswith("model.vggt.") or ".visual." in n for n in trainable)
    llm = {n for n in trainable if not n.startswith("model.fusion.")}
    assert (llm == set()) if mode == "frozen_llm" else (llm and all("lora_" in n for n in llm))
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert len(res.losses) == 2
    assert set(lrs) <= {"fusion_decay", "fusion_no_decay", "llm_decay", "llm_no_decay"} and "fusion_decay" in lrs


def test_param_groups_and_schedule(data, tmp_path):
    t = _trainer(_cfg(data, tmp_path, max_steps=100, learning_rate=1e-5, fusion_learning_rate=1e-4,
                      weight_decay=0.1))
    t._setup()
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert set(groups) == {"fusion_decay", "fusion_no_decay", "llm_decay", "llm_no_decay"}
    assert groups["llm_no_decay"]["weight_decay"] == 0.0 and groups["llm_decay"]["weight_decay"] == 0.1
    assert t.warmup_steps == 3                                  # 3% of 100
    base = {"fusion_decay": 1e-4, "llm_decay": 1e-5}
    sched = t.scheduler.scheduler
    lrs = []
    for _ in range(100):
        lrs.append({k: t.optimizer.param_groups[[g["name"] for g in t.optimizer.param_groups].index(k)]["lr"]
                    for k in base})
        sched.step()
    assert lrs[0]["fusion_decay"] == pytest.approx(1e-4 / 3) and lrs[2]["llm_decay"] == pytest.approx(1e-5)
    assert lrs[51]["llm_decay"] == pytest.approx(0.5e-5, rel=0.05) and lrs[99]["fusion_decay"] < 1e-6


def test_step_sampler_partitions_global_batches():
    kw = dict(global_batch=8, per_device=2, seed=3, start_step=0, total_steps=5)
    one = list(StepSampler(13, world=1, rank=0, **kw))
    two = [list(StepSampler(13, world=2, rank=r, **kw)) for r in range(2)]
    assert all(len(b) == 2 for b in one) and len(one) == 5 * 4
    for step in range(5):           # same samples in every optimizer step, whatever the number of ranks
        a = sorted(i for b in one[step * 4:(step + 1) * 4] for i in b)
        b = sorted(i for r in range(2) for mb in two[r][step * 2:(step + 1) * 2] for i in mb)
        assert a == b
    first_epoch = sorted(i for b in one[:8] for i in b)     # 2 steps/epoch: 16 slots, 13 samples + 3 wrapped
    assert set(first_epoch) == set(range(13))
    resumed = list(StepSampler(13, world=1, rank=0, **dict(kw, start_step=3)))
    assert resumed == one[12:]


def test_bf16_autocast_with_bf16_frozen_encoders(data, tmp_path):
    t = _trainer(_cfg(data, tmp_path, max_steps=2, precision="bf16"))
    res = t.train()
    m = t.accelerator.unwrap_model(t.model_ddp)
    assert m.vggt.camera_token.dtype == torch.bfloat16                 # frozen: stored in bf16
    assert m.fusion.out_proj.weight.dtype == torch.float32             # trainable: fp32 master weights
    assert all(torch.isfinite(torch.tensor(v)) for v in res.losses.values())


def test_deepspeed_config_is_filled_from_the_train_config():
    from geoalign.training.trainer import DEFAULT_DEEPSPEED_CONFIG, deepspeed_config_dict

    assert os.path.isfile(DEFAULT_DEEPSPEED_CONFIG)
    cfg = TrainConfig(global_batch_size=64, per_device_batch_size=2, max_grad_norm=0.5)
    ds = deepspeed_config_dict(cfg, grad_accum=4)                       # 64 = 2 x 8 GPUs x 4
    assert ds["zero_optimization"]["stage"] == 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 2, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds


def test_paper_config_file_holds_the_defaults():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = TrainConfig.from_yaml(os.path.join(root, "configs", "train_paper.yaml"))
    d = TrainConfig()
    for key in ("num_train_epochs", "global_batch_size", "learning_rate", "lr_scheduler", "warmup_ratio",
                "precision", "distributed", "train_mode", "group_size"):
        assert getattr(c, key) == getattr(d, key), key
    assert (d.num_train_epochs, d.global_batch_size, d.learning_rate, d.lr_scheduler, d.warmup_ratio, d.precision,
            d.distributed) == (1.0, 64, 1e-5, "cosine", 0.03, "bf16", "deepspeed")
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"lr": 1})
