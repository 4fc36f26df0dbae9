"""geoalign/training/safe_loading.py and the checkpoint manifest (training/checkpoint.py): a checkpoint directory from
someone else runs no code on resume, and a damaged one is named before anything is restored.

Every hostile file here holds hostile_file_helpers.CodeOnLoad, whose unpickling with arbitrary globals creates a
marker file; test_the_payload_is_live shows that it does, so "no marker" below means the loader refused it.
"""
from __future__ import annotations

import logging
import pickle
import shutil

import pytest
import torch

from geoalign.training import checkpoint as ckpt
from geoalign.training.safe_loading import UnsafeCheckpointError, safe_dcp_load

from hostile_file_helpers import CodeOnLoad, hostile_torch_file, reseal_checkpoint
from train_helpers import tiny_trainer, train_config


@pytest.fixture(scope="module")
def run(train_data, tmp_path_factory):
    """A 2-step single-process run with a checkpoint after each step: (config kwargs, output dir)."""
    out = tmp_path_factory.mktemp("run")
    tiny_trainer(train_config(train_data, out, max_steps=2, save_steps=1)).train()
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1, 2]
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CodeOnLoad(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_hostile_accelerate_file_is_refused_and_runs_nothing(run, train_data, tmp_path, name):
    out = copy_run(run, tmp_path)
    marker = tmp_path / "ran"
    path = out / "checkpoint-1" / name
    assert path.exists()
    hostile_torch_file(path, marker)
    reseal_checkpoint(out / "checkpoint-1")
    trainer = tiny_trainer(train_config(train_data, out, max_steps=2, resume_from_checkpoint=str(path.parent)))
    with pytest.raises(UnsafeCheckpointError,
                       match=f"cannot read checkpoint file {path} safely: .*unsupported GLOBAL posix.system"):
        trainer.train()
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "missing"])
def test_damaged_file_is_named_and_latest_falls_back_to_the_newest_intact(run, tmp_path, caplog, damage):
    out = copy_run(run, tmp_path)
    path = out / "checkpoint-2" / "optimizer.bin"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        why = f"{path} has {len(data) // 2} bytes, the manifest says {len(data)}"
    elif damage == "bit-flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
        why = f"{path} does not match its SHA-256"
    else:
        path.unlink()
        why = f"checkpoint file missing: {path}"
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        ckpt.resolve_resume(str(out / "checkpoint-2"), str(out))
    with caplog.at_level(logging.WARNING, logger="geoalign.training"):
        assert ckpt.resolve_resume("latest", str(out)) == str(out / "checkpoint-1")
    assert any(f"skipping damaged {out / 'checkpoint-2'}" in r.getMessage() and why in r.getMessage()
               for r in caplog.records)


def test_latest_resume_after_damage_is_exact_from_the_older_checkpoint(run, train_data, tmp_path):
    """The fallback is a real resume: a run continued from checkpoint-1 (checkpoint-2 damaged) gives step 2's loss
    of the uninterrupted run bit for bit."""
    out = copy_run(run, tmp_path)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    resumed = tiny_trainer(train_config(train_data, out, max_steps=2, resume_from_checkpoint="latest")).train()
    full = tiny_trainer(train_config(train_data, tmp_path / "full", max_steps=2)).train()
    assert sorted(resumed.losses) == [2] and resumed.losses[2] == full.losses[2]


def _dcp_checkpoint(path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(12.0).reshape(3, 4)},
             "optimizer": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["w"]}]}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(path))
    return state


def test_dcp_round_trip_through_the_safe_reader(tmp_path):
    _dcp_checkpoint(tmp_path / "dcp")
    target = {"model": {"w": torch.zeros(3, 4)}, "optimizer": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0),
                                                                                    "params": [""]}]}}
    with pytest.warns(UserWarning):
        safe_dcp_load(target, str(tmp_path / "dcp"))
    assert torch.equal(target["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert target["optimizer"]["param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["w"]}]


def test_dcp_metadata_with_code_is_refused(tmp_path):
    _dcp_checkpoint(tmp_path / "dcp")
    marker = tmp_path / "ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(CodeOnLoad(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata safely: global posix\.system is not allowed"):
        safe_dcp_load({"model": {"w": torch.zeros(3, 4)}}, str(tmp_path / "dcp"))
    assert not marker.exists()


def test_dcp_item_with_code_is_refused(tmp_path):
    """A non-tensor DCP item is stored as torch.save bytes; DCP's own planner reads it with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    with pytest.warns(UserWarning):
        dcp.save({"extra": CodeOnLoad(marker)}, checkpoint_id=str(tmp_path / "dcp"))
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="extra .a DCP item. safely: .*unsupported GLOBAL posix.system"), \
            pytest.warns(UserWarning):
        safe_dcp_load({"extra": None}, str(tmp_path / "dcp"))
    assert not marker.exists()


def test_deepspeed_engine_files_load_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from geoalign.training.safe_loading import deepspeed_weights_only

    marker = tmp_path / "ran"
    hostile_torch_file(tmp_path / "optim_states.pt", marker)
    torch.save({"ok": torch.ones(2)}, str(tmp_path / "fine.pt"))
    with deepspeed_weights_only():
        engine = TorchCheckpointEngine()
        assert torch.equal(engine.load(str(tmp_path / "fine.pt"))["ok"], torch.ones(2))
        with pytest.raises(UnsafeCheckpointError, match="optim_states.pt safely: .*unsupported GLOBAL posix.system"):
            engine.load(str(tmp_path / "optim_states.pt"))
    assert not marker.exists()
    assert TorchCheckpointEngine.load is not None and "weights_only" not in TorchCheckpointEngine.load.__qualname__


def test_vggt_model_pt_with_code_is_refused(tmp_path):
    from geoalign.geometry.checkpoint import read_aggregator_state_dict

    marker = tmp_path / "ran"
    hostile_torch_file(tmp_path / "model.pt", marker)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_aggregator_state_dict(tmp_path / "model.pt")
    assert not marker.exists()


def test_a_pickle_in_place_of_the_state_file_is_not_a_checkpoint(run, tmp_path):
    """trainer_state.json is read as JSON only: a pickle there (that would run a command) makes the directory an
    incomplete checkpoint, skipped by --resume latest and refused by --resume DIR."""
    out = copy_run(run, tmp_path)
    marker = tmp_path / "ran"
    (out / "checkpoint-2" / ckpt.STATE_FILE).write_bytes(pickle.dumps(CodeOnLoad(marker)))
    assert ckpt.resolve_resume("latest", str(out)) == str(out / "checkpoint-1")
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        ckpt.resolve_resume(str(out / "checkpoint-2"), str(out))
    assert not marker.exists()
