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
