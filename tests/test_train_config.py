"""geoalign.training.config: the paper's recipe is the default and the shipped YAML holds it."""
from __future__ import annotations

import os

import pytest

from geoalign.training.config import TrainConfig


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


@pytest.mark.parametrize("key, value, message", [
    ("fsdp_sharding", "HYBRID", "fsdp_sharding: must be one of"),
    ("save_dtype", "float32", "save_dtype: must be one of"),
    ("report_to", ["tensorboard", "mlflow"], "report_to: trackers must be among"),
    ("eval_steps", -1, "eval_steps must be >= 0"),
])
def test_engine_and_output_options_are_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_single_strings_become_lists():
    c = TrainConfig(eval_data="held_out.jsonl", report_to="tensorboard")
    assert (c.eval_data, c.report_to) == (["held_out.jsonl"], ["tensorboard"])
    assert TrainConfig(report_to="none").report_to == []
