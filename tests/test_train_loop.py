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

from train_helpers import tiny_trainer, train_config  # noqa: E402


def test_loss_decreases(train_data, tmp_path):
    cfg = train_config(train_data, tmp_path, max_steps=24, save_final_model=True, logging_steps=8)
    t = tiny_trainer(cfg)
    res = t.train()
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

    m = GeoAlignForConditionalGeneration.from_pretrained(res.final_model_dir).eval()
    assert m.fusion.config.group_size == 4
    trained = t.accelerator.unwrap_model(t.model_ddp)
    assert torch.equal(m.fusion.out_proj.weight, trained.fusion.out_proj.weight)
    assert torch.equal(m.lm_head.weight, trained.lm_head.weight)                 # full mode: the LLM trained too
    mb = t.collator([t.train_dataset[0]])
    mb.pop("ids")
    mb.pop("labels")
    out = m.generate(**mb, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, mb["input_ids"].shape[1] + 2)
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == [8, 16, 24]
    groups = {f"lr/{g['name']}": g["lr"] for g in t.optimizer.param_groups}      # every group, by name
    assert set(groups) == {"lr/fusion_decay", "lr/fusion_no_decay", "lr/llm_decay", "lr/llm_no_decay"}
    assert all(log[-1][k] == pytest.approx(v) for k, v in groups.items())
    assert {"loss", "samples_per_s", "tokens_per_s", "peak_mem_gb"} <= set(log[0])
    assert (log[0]["distributed_type"], log[0]["world_size"]) == ("NO", 1) and "distributed_type" not in log[1]
    state = json.loads((tmp_path / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["distributed_type"] == "NO"


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


def test_resume_latest_without_a_checkpoint_says_it_starts_at_step_0(train_data, tmp_path, caplog):
    """--resume latest is what a requeued job passes every time: with no checkpoint yet it starts at step 0 and
    says so (a warning), rather than failing or starting silently."""
    import logging

    with caplog.at_level(logging.WARNING, logger="geoalign.training"):
        res = tiny_trainer(train_config(train_data, tmp_path, max_steps=1, resume_from_checkpoint="latest")).train()
    assert res.global_step == 1 and sorted(res.losses) == [1]
    said = [r.getMessage() for r in caplog.records if "resume_from_checkpoint" in r.getMessage()]
    assert said == [f"resume_from_checkpoint='latest': no checkpoint in {tmp_path} yet, so training starts at step 0"]


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
                      lora_alpha=8, save_final_model=True))
    res = t.train()
    from geoalign.modeling import GeoAlignForConditionalGeneration

    final = GeoAlignForConditionalGeneration.from_pretrained(res.final_model_dir)        # every mode loads back
    assert torch.equal(final.fusion.out_proj.weight, t.accelerator.unwrap_model(t.model_ddp).fusion.out_proj.weight)
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




class _ForwardReached(Exception):
    pass


def test_batches_reach_the_accelerator_device(train_data, tmp_path, monkeypatch):
    """Whatever device accelerate picks, the micro-batch tensors the model's forward receives are on it. The
    accelerator is told its device is "meta": a loop that left batches where the collator made them (CPU) fails."""
    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=1))
    t._setup()
    monkeypatch.setattr(type(t.accelerator), "device", property(lambda self: torch.device("meta")))
    seen = {}

    def hook(module, args, kwargs):
        for k, v in kwargs.items():
            for i, x in enumerate(v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, torch.Tensor):
                    seen[k if i == 0 else f"{k}[{i}]"] = x.device
        raise _ForwardReached

    t.accelerator.unwrap_model(t.model_ddp).register_forward_pre_hook(hook, with_kwargs=True)
    with pytest.raises(_ForwardReached):
        t.train()
    assert {"input_ids", "labels", "attention_mask", "vggt_pixel_values", "num_items_in_batch"} <= set(seen)
    assert all(d.type == "meta" for d in seen.values()), seen


def test_eval_loss_is_the_token_mean_over_eval_data(train_data, tmp_path):
    """eval_data's loss every eval_steps (and at the end): the mean over all its supervised tokens, computed
    independently here with the model's default per-batch mean loss, weighted by each record's token count."""
    from geoalign.training.loss_scaling import supervised_tokens

    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=3, eval_data=[train_data[0]], eval_steps=2,
                                  logging_steps=1))
    res = t.train()
    assert sorted(res.eval_losses) == [2, 3]
    model = t.accelerator.unwrap_model(t.model_ddp).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(t.eval_dataset)):
            mb = t.collator([t.eval_dataset[i]])
            mb.pop("ids", None)
            n = supervised_tokens([mb])
            total += float(model(**mb).loss) * n
            tokens += n
    assert len(t.eval_dataset) == 8 and tokens > 8
    assert res.eval_losses[3] == pytest.approx(total / tokens, rel=1e-5)
    assert res.eval_losses[2] != res.eval_losses[3]            # the model trained in between
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r] == sorted(res.eval_losses.items())


def test_lora_final_model_is_merged_and_loads(train_data, tmp_path):
    """A LoRA run's final directory is a plain GeoAlign model with the adapters folded in: from_pretrained gives the
    same logits as the trained adapter model; save_dtype casts every floating tensor."""
    pytest.importorskip("peft")
    from safetensors import safe_open

    from geoalign.modeling import GeoAlignForConditionalGeneration

    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=2, train_mode="lora", lora_r=4, lora_alpha=8,
                                  learning_rate=3e-2, save_final_model=True))
    res = t.train()
    trained = t.accelerator.unwrap_model(t.model_ddp).eval()
    loaded = GeoAlignForConditionalGeneration.from_pretrained(res.final_model_dir).eval()
    with safe_open(os.path.join(res.final_model_dir, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    mb = t.collator([t.train_dataset[0]])
    mb.pop("ids", None)
    with torch.no_grad():
        want, got = trained(**mb).logits, loaded(**mb).logits
        without = t.accelerator.unwrap_model(t.model_ddp)
        deltas = [m.lora_B["default"].weight.abs().max() for m in without.modules() if hasattr(m, "lora_B")]
    assert deltas and max(deltas) > 0                          # the adapters trained, so merging changes weights
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and it answers, through generate() and the CLI
    from PIL import Image

    from geoalign.cli import main as cli

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(torch.randint(0, 255, (56, 56, 3), dtype=torch.uint8).numpy()).save(frames / f"{i}.png")
    assert cli(["answer", "--model", res.final_model_dir, "--images", str(frames), "--question", "what colour?",
                "--num-frames", "2", "--max-new-tokens", "2", "--json", "--device", "cpu"]) == 0

    t2 = tiny_trainer(train_config(train_data, tmp_path / "bf16", max_steps=1, save_final_model=True,
                                   save_dtype="bf16"))
    out = t2.train().final_model_dir
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes
    w = GeoAlignForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).fusion.out_proj.weight
    assert torch.equal(w, t2.accelerator.unwrap_model(t2.model_ddp).fusion.out_proj.weight.detach().bfloat16())


def test_tensorboard_tracker(train_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_trainer(train_config(train_data, tmp_path, max_steps=2, logging_steps=1, report_to=["tensorboard"])).train()
    runs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "runs") for f in fs if "tfevents" in f]
    assert runs, list(os.walk(tmp_path))
    acc = EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    assert {"loss", "lr/fusion_decay", "samples_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


@pytest.mark.gpu
def test_one_bf16_step_on_cuda(train_data, tmp_path):
    """One process on the GPU, bf16 autocast with bf16 frozen encoders: batches reach the GPU and the step is finite."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=1, precision="bf16", logging_steps=1))
    res = t.train()
    m = t.accelerator.unwrap_model(t.model_ddp)
    assert t.accelerator.device.type == "cuda" and m.fusion.out_proj.weight.is_cuda
    assert torch.isfinite(torch.tensor(res.losses[1]))
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert log[0]["peak_mem_gb"] > 0
