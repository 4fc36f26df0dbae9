"""Training loop on CPU with the tiny random model: the loss falls, resume matches an uninterrupted run, atomic
checkpoints, LoRA / frozen-LLM modes."""
from __future__ import annotations

import json
import os

import pytest
import torch



pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")

from geoalign.training import checkpoint as ckpt  # noqa: E402

from helpers import tiny_trainer, train_config  # noqa: E402


def test_loss_decreases(train_data, tmp_path):
    cfg = train_config(train_data, tmp_path, max_steps=24, save_final_model=True, logging_steps=8)
    res = tiny_trainer(cfg).train()
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


def test_resume_matches_uninterrupted(train_data, tmp_path):
    full = tiny_trainer(train_config(train_data, tmp_path / "a", max_steps=8)).train()
    part = tiny_trainer(train_config(train_data, tmp_path / "b", max_steps=8)).train(stop_after=4)
    assert part.global_step == 4 and part.last_checkpoint.endswith("checkpoint-4")
    resumed = tiny_trainer(train_config(train_data, tmp_path / "b", max_steps=8, resume_from_checkpoint="latest"),
                       perturb=True).train()
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for s in range(1, 5):
        assert part.losses[s] == full.losses[s]
    for s in range(5, 9):
        assert resumed.losses[s] == pytest.approx(full.losses[s], rel=1e-6, abs=1e-7), (s, resumed.losses, full.losses)


def test_staging_checkpoint_is_ignored(train_data, tmp_path):
    # a crash mid-save leaves a staging directory (and maybe a half-written checkpoint without its state file)
    os.makedirs(tmp_path / ".staging-checkpoint-6")
    (tmp_path / ".staging-checkpoint-6" / "model.safetensors").write_bytes(b"garbage")
    os.makedirs(tmp_path / "checkpoint-9")
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    assert ckpt.resolve_resume("latest", str(tmp_path)) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-9"), str(tmp_path))
    res = tiny_trainer(train_config(train_data, tmp_path, max_steps=2, save_steps=1, save_total_limit=1)).train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    assert not (tmp_path / ".staging-checkpoint-6").exists()
    assert res.last_checkpoint.endswith("checkpoint-2")


def test_resume_rejects_other_batch_size(train_data, tmp_path):
    tiny_trainer(train_config(train_data, tmp_path, max_steps=4)).train(stop_after=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        tiny_trainer(train_config(train_data, tmp_path, max_steps=4, global_batch_size=4, resume_from_checkpoint="latest")).train()


@pytest.mark.parametrize("mode", ["frozen_llm", "lora"])
def test_train_modes(train_data, tmp_path, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=2, train_mode=mode, fusion_learning_rate=1e-2, lora_r=4,
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


def test_bf16_autocast_with_bf16_frozen_encoders(train_data, tmp_path):
    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=2, precision="bf16"))
    res = t.train()
    m = t.accelerator.unwrap_model(t.model_ddp)
    assert m.vggt.camera_token.dtype == torch.bfloat16                 # frozen: stored in bf16
    assert m.fusion.out_proj.weight.dtype == torch.float32             # trainable: fp32 master weights
    assert all(torch.isfinite(torch.tensor(v)) for v in res.losses.values())


