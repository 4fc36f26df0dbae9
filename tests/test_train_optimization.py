"""geoalign.training.optimization: AdamW's four parameter groups and the warmup + cosine schedule (the trainable
parts per train_mode are tested through the loop in test_train_loop.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")

from train_helpers import tiny_trainer, train_config  # noqa: E402


def test_param_groups_and_schedule(train_data, tmp_path):
    t = tiny_trainer(train_config(train_data, tmp_path, max_steps=100, learning_rate=1e-5, fusion_learning_rate=1e-4,
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
