"""The GAP-MLLM recipe as shipped (configs/gap_pretrain.yaml, then configs/gap_finetune.yaml) on procedural scenes,
end to end on CPU with tiny base checkpoints: stage 1 builds a fresh progressive GAP fusion from qwen_path +
vggt_path with the config's fusion_config (its level ids scaled to the tiny model), the loss falls; stage 2 starts
from stage 1's final directory (the yaml's model_path), fine-tunes on the three tasks (detection, grounding by
marker and by language, dense captioning) and its loss falls too; then `geoalign eval gap` answers a held-out
scene's records with the fine-tuned model and `geoalign score gap` rescores them: every metric is reported (the
tiny model's values are not asserted, only that they are in range and agree between eval and score)."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("accelerate")

from train_helpers import write_base_checkpoints  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(precision="no", distributed="ddp", global_batch_size=2, per_device_batch_size=1, num_workers=0,
              logging_steps=0, save_steps=0, progress_bar=False, num_frames=2, learning_rate=3e-3,
              gradient_checkpointing=False)


def _mean(losses, part):
    values = [losses[s] for s in sorted(losses)]
    n = len(values) // 4
    return sum(values[:n] if part == "first" else values[-n:]) / n


def test_two_stage_recipe_on_synthetic_scenes(tmp_path, monkeypatch):
    from geoalign.cli import main
    from geoalign.gap.procedural import make_box_room, write_scannet_layout
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.training.config import TrainConfig
    from geoalign.training.trainer import GeoAlignTrainer

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)                      # the yamls' relative paths: data/..., outputs/...
    for k in range(2):
        write_scannet_layout(make_box_room(seed=30 + k, num_frames=5, height=56, width=70), f"scans/scene00{k}")
    write_scannet_layout(make_box_room(seed=40, num_frames=5, height=56, width=70, stacked=1), "held_out/scene0100")
    common = ["--scenes", "scans", "--frames", "2", "--samples-per-scene", "4", "--no-progress"]
    assert main(["gap-data", "--out", "data/gap_pretrain.json", "--prompts-per-sample", "2", *common]) == 0
    assert main(["gap-data", "--task", "finetune", "--out", "data/gap_finetune.json", "--grounding-per-sample", "1",
                 *common]) == 0
    tasks = {(r["metadata"]["task"], r["metadata"].get("query")) for r in json.load(open("data/gap_finetune.json"))}
    assert tasks == {("gap_detection", None), ("gap_grounding", "marker"), ("gap_grounding", "language"),
                     ("gap_dense_caption", None)}, tasks
    assert main(["gap-data", "--task", "finetune", "--scenes", "held_out", "--frames", "2", "--samples-per-scene",
                 "1", "--grounding-per-sample", "1", "--captions-once-per-object", "--no-progress",
                 "--out", "eval/gap_test.json"]) == 0
    qwen, vggt = write_base_checkpoints("base")

    shipped = TrainConfig.from_yaml(os.path.join(ROOT, "configs", "gap_pretrain.yaml")).fusion_config
    assert shipped["fusion"] == "gated_2d3d" and len(shipped["progressive_geo_layers"]) == 4
    tiny_levels = {**shipped, "progressive_vit_blocks": [0], "progressive_geo_layers": [1, 3],   # the tiny model's
                   "progressive_inject_layers": [0], "progressive_vit_hidden": 32}                 # 2 ViT, 4 VGGT layers
    stage1 = TrainConfig.from_yaml(os.path.join(ROOT, "configs", "gap_pretrain.yaml"),
                                   {**ENGINE, "qwen_path": qwen, "vggt_path": vggt, "max_steps": 12,
                                    "fusion_learning_rate": 3e-3, "fusion_config": tiny_levels})
    res1 = GeoAlignTrainer(stage1).train()
    assert _mean(res1.losses, "last") < 0.8 * _mean(res1.losses, "first"), res1.losses
    assert res1.final_model_dir == os.path.join("outputs", "gap-pretrain", "final")

    stage2 = TrainConfig.from_yaml(os.path.join(ROOT, "configs", "gap_finetune.yaml"), {**ENGINE, "max_steps": 12})
    assert stage2.model_path == res1.final_model_dir                     # the shipped chain: stage 1 seeds stage 2
    t2 = GeoAlignTrainer(stage2)
    t2._setup()
    seeded = GeoAlignForConditionalGeneration.from_pretrained(res1.final_model_dir)
    start = t2.accelerator.unwrap_model(t2.model_ddp)
    assert start.fusion.config.progressive_geo_layers == (1, 3) and start.fusion.config.gate_granularity == "token"
    for name, p in seeded.named_parameters():
        if name.startswith(("model.fusion.", "lm_head.")):
            assert torch.equal(dict(start.named_parameters())[name], p), name
    res2 = t2.train()
    assert _mean(res2.losses, "last") < 0.8 * _mean(res2.losses, "first"), res2.losses
    final = GeoAlignForConditionalGeneration.from_pretrained(res2.final_model_dir)
    assert final.fusion.config.progressive_inject_layers == (0,)

    # eval gap -> score gap on the held-out scene with the fine-tuned model (greedy, a few tokens: the tiny model
    # does not learn boxes in 12 steps; the point is that every task runs and is scored the same both ways)
    assert main(["eval", "gap", "--data", "eval", "--model", res2.final_model_dir, "--out", "eval/pred.jsonl",
                 "--max-new-tokens", "8", "--num-frames", "2", "--no-java", "--no-progress"]) == 0
    preds = [json.loads(line) for line in open("eval/pred.jsonl")]
    assert {p["gap_task"] for p in preds} == {"detection", "grounding", "dense_caption"}
    assert main(["score", "gap", "eval/pred.jsonl", "--no-java", "--json", "eval/scores.json"]) == 0
    scores = json.load(open("eval/scores.json"))
    assert set(scores["detection"]) >= {"mAP@0.25", "mAP@0.5"}
    assert {"acc@0.25", "acc@0.5", "unique", "multiple"} <= set(scores["grounding"])
    for k in ("@0.25", "@0.5"):
        caption = scores["dense_caption"][k]
        assert {"CIDEr", "BLEU-4", "ROUGE-L"} <= set(caption) and all(v >= 0 for v in caption.values()), caption
