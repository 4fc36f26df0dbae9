"""Interrupted writes (geoalign.atomic_files): every file the package writes, with the write made to fail halfway.

The failure is injected at the module's two low-level writers: ``_write`` writes half of its bytes and raises
OSError(ENOSPC); ``_save_file`` writes a complete safetensors file, cuts it to half and raises. A writer that wrote
straight to its final path would leave that half file behind; every test here asserts that the path still holds the
previous complete content (or does not exist), loads as before, and that no temporary or staging file is left.
test_no_direct_writers checks that nothing in the package writes files any other way.
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from geoalign import GeoAlignConfig, atomic_files
from geoalign.eval.runner import read_predictions, run_eval
from geoalign.modeling import load_fusion, save_fusion
from geoalign.training import checkpoint as ckpt
from geoalign.training.config import TrainConfig

from helpers import Shape, make_fusion

ROOT = Path(__file__).resolve().parents[1]


class Interrupt:
    """Make the n-th low-level write (counting both writers, from 1) fail halfway."""

    def __init__(self, monkeypatch, at: int = 1):
        self.at, self.count, self.fired = at, 0, False
        real_write, real_save = atomic_files._write, atomic_files._save_file

        def write(f, data):
            if self._due():
                real_write(f, data[: len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device (injected halfway through a write)")
            real_write(f, data)

        def save(tensors, path, metadata):
            real_save(tensors, path, metadata)
            if self._due():
                size = os.path.getsize(path)
                with open(path, "r+b") as fh:
                    fh.truncate(size // 2)
                raise OSError(errno.ENOSPC, "No space left on device (injected halfway through a write)")

        monkeypatch.setattr(atomic_files, "_write", write)
        monkeypatch.setattr(atomic_files, "_save_file", save)

    def _due(self) -> bool:
        self.count += 1
        if self.count == self.at:
            self.fired = True
            return True
        return False


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ primitives
def test_write_bytes_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_files.write_bytes(path, b"old content")
    Interrupt(monkeypatch)
    with pytest.raises(atomic_files.DiskFullError, match=f"no space left to write the file {path}: [0-9]+ bytes free") \
            as err:
        atomic_files.write_bytes(path, b"new content that is longer")
    assert "injected" in str(err.value.__cause__)
    assert path.read_bytes() == b"old content" and leftovers(tmp_path) == []


def test_write_json_interrupted_on_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    Interrupt(monkeypatch)
    with pytest.raises(OSError):
        atomic_files.write_json(tmp_path / "new.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_save_safetensors_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    atomic_files.save_safetensors(path, {"x": torch.ones(64)})
    Interrupt(monkeypatch)
    with pytest.raises(OSError):
        atomic_files.save_safetensors(path, {"x": torch.zeros(4096)})
    assert torch.equal(load_file(str(path))["x"], torch.ones(64)) and leftovers(tmp_path) == []


def test_staged_directory_is_all_or_nothing(tmp_path):
    target = tmp_path / "out"
    with atomic_files.staged_directory(target, "MARK") as stage:
        Path(stage, "MARK").write_text("1")
        Path(stage, "a").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_files.staged_directory(target, "MARK") as stage:
            Path(stage, "MARK").write_text("2")
            Path(stage, "a").write_text("second")
            raise RuntimeError("crash halfway through the directory")
    assert (target / "a").read_text() == "first" and leftovers(tmp_path) == []
    with atomic_files.staged_directory(target, "MARK") as stage:
        Path(stage, "MARK").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["MARK"]  # replaced whole: no stale "a"


def test_staged_directory_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        with atomic_files.staged_directory(tmp_path / "mine", "MARK"):
            pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_append_jsonl_interrupted_loses_only_the_cut_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    atomic_files.append_jsonl(path, [{"step": 1}])
    interrupt = Interrupt(monkeypatch)
    with pytest.raises(OSError):
        atomic_files.append_jsonl(path, [{"step": 2, "loss": 0.25}])
    assert interrupt.fired and not path.read_text().endswith("\n")  # a cut line is on disk ...
    assert atomic_files.read_jsonl(path) == [{"step": 1}]  # ... and ignored by readers
    monkeypatch.undo()
    atomic_files.append_jsonl(path, [{"step": 2}])  # ... and removed by the next append
    assert atomic_files.read_jsonl(path) == [{"step": 1}, {"step": 2}]


# ---------------------------------------------------------------------------------- every file the package writes
def test_geoalign_config(tmp_path, monkeypatch):
    old = GeoAlignConfig(hidden_size=24, geo_dim=20, bank_layers=(0, 1, 2))
    old.save_pretrained(tmp_path)
    Interrupt(monkeypatch)
    with pytest.raises(OSError):
        GeoAlignConfig(hidden_size=48, geo_dim=20, bank_layers=(0, 1, 2)).save_pretrained(tmp_path)
    assert GeoAlignConfig.from_pretrained(tmp_path) == old and leftovers(tmp_path) == []


def test_train_config(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    TrainConfig(model_path="m", train_data=["d.json"], learning_rate=1e-5).save(path)
    Interrupt(monkeypatch)
    with pytest.raises(OSError):
        TrainConfig(model_path="m", train_data=["d.json"], learning_rate=3e-4).save(path)
    assert json.loads(path.read_text())["learning_rate"] == 1e-5 and leftovers(tmp_path) == []


@pytest.mark.parametrize("at", [1, 2])  # 1: the config JSON, 2: the weights
def test_fusion_directory(tmp_path, monkeypatch, at):
    shape = Shape(L=5, M=3, K=2, G=4)
    old, new = make_fusion(shape, torch.float32, seed=1), make_fusion(shape, torch.float32, seed=2)
    save_fusion(old, tmp_path / "fusion")
    interrupt = Interrupt(monkeypatch, at=at)
    with pytest.raises(OSError):
        save_fusion(new, tmp_path / "fusion")
    assert interrupt.fired
    loaded = load_fusion(tmp_path / "fusion")
    for (name, a), b in zip(loaded.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name
    assert leftovers(tmp_path) == []


def test_model_directory(tmp_path, monkeypatch):
    from geoalign.modeling import GeoAlignForConditionalGeneration
    from geoalign.tiny import tiny_model

    from geoalign.processing import GeoAlignProcessor

    model, tok = tiny_model(seed=0)
    processor = GeoAlignProcessor(tok, None, group_size=4)
    model.save_pretrained(tmp_path / "model", processor=processor)
    old = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(1.0)

    def half_written_tokenizer(directory):  # after transformers has written the new weights into the directory
        Path(directory, "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise OSError(errno.ENOSPC, "No space left on device (injected halfway through a write)")

    monkeypatch.setattr(processor, "save_pretrained", half_written_tokenizer)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(tmp_path / "model", processor=processor)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    back = GeoAlignForConditionalGeneration.from_pretrained(tmp_path / "model")
    for name, a in back.fusion.state_dict().items():
        assert torch.equal(a, old[name]), name  # the old fusion, not the new one


def test_training_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    stage = ckpt.begin(out, 1, True)
    Path(stage, "model.safetensors").write_bytes(b"1")
    ckpt.commit(out, 1, {"global_step": 1})
    stage = ckpt.begin(out, 2, True)
    Path(stage, "model.safetensors").write_bytes(b"2")
    Interrupt(monkeypatch)  # trainer_state.json of step 2 fails halfway
    with pytest.raises(OSError):
        ckpt.commit(out, 2, {"global_step": 2})
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, 1)
    assert ckpt.resolve_resume("latest", out) == ckpt.checkpoint_dir(out, 1)
    monkeypatch.undo()
    stage = ckpt.begin(out, 2, True)  # the retry starts from a clean stage and succeeds
    Path(stage, "model.safetensors").write_bytes(b"2")
    ckpt.commit(out, 2, {"global_step": 2})
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_dir(out, 2)
    assert [n for n in os.listdir(out) if n.startswith(".")] == []


def test_predictions_file(tmp_path, monkeypatch):
    from geoalign.eval.predictor import Sample

    class Echo:
        def predict(self, batch):
            return [f"answer {s.id}" for s in batch]

    samples = [Sample(id=f"q{i}", task="sqa3d", prompt="?", media=None) for i in range(6)]
    path = tmp_path / "predictions.jsonl"
    Interrupt(monkeypatch, at=2)  # the second batch's append fails halfway: q2's line is whole, q3's is cut
    with pytest.raises(OSError):
        run_eval(samples, Echo(), str(path), batch_size=2, progress=False)
    assert [r["id"] for r in read_predictions(str(path))] == ["q0", "q1", "q2"]
    monkeypatch.undo()
    info = run_eval(samples, Echo(), str(path), batch_size=2, progress=False)
    assert info["skipped"] == 3 and info["written"] == 3
    records = atomic_files.read_jsonl(path)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(6)]
    assert all(r["prediction"] == f"answer {r['id']}" for r in records)


def test_bench_results(tmp_path, monkeypatch):
    from bench.report import write_json

    path = tmp_path / "results.json"
    write_json(str(path), {"rows": [1]})
    Interrupt(monkeypatch)
    with pytest.raises(OSError):
        write_json(str(path), {"rows": [1, 2, 3]})
    assert json.loads(path.read_text()) == {"rows": [1]} and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- no direct writers
DIRECT_WRITE = re.compile(r"open\([^)]*,\s*[\"'](?:w|a|x|wb|ab|r\+b|rb\+)[\"']|save_file\(|torch\.save\(|\.savefig\("
                          r"(?!buf)|(?<!atomic_files)\.write_text\(|(?<!atomic_files)\.write_bytes\(")
ALLOWED = {
    "geoalign/atomic_files.py": "the one module that writes",
    "geoalign/training/synthetic.py": "writes synthetic test media (videos, images, JSON) into a fresh directory",
    "geoalign/memory.py": "writes to /proc/self/clear_refs (a kernel control file, not data)",
    "kernels/geoalign_kernels/configs.py": "the kernel package cannot import geoalign: write_atomic (write_tuned, "
                                           "aot_check's JSON) does temp + fsync + rename with os calls",
    "bench/gpu_proof.py": "appends its child processes' output to the run's log (its JSON goes through atomic_files)",
}


def test_no_direct_writers():
    found = []
    for base in ("geoalign", "kernels", "bench"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED or "/test_" in rel:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if DIRECT_WRITE.search(code):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "files written outside geoalign.atomic_files:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------ exact formats and edge cases
def test_write_json_format_is_two_space_sorted_utf8(tmp_path):
    path = tmp_path / "meta.json"
    atomic_files.write_json(path, {"task": "scanqa", "answer": "café", "n": [1, 2]})
    assert path.read_bytes() == ('{\n  "answer": "café",\n  "n": [\n    1,\n    2\n  ],\n  "task": "scanqa"\n}\n'
                                 ).encode("utf-8")
    atomic_files.write_json(path, {"b": 1, "a": 2}, indent=None)
    assert path.read_bytes() == b'{"a": 2, "b": 1}\n'


def test_save_safetensors_keeps_metadata(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    atomic_files.save_safetensors(path, {"x": torch.arange(6.0)}, metadata={"format": "pt", "global_step": "12"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "global_step": "12"}
        assert torch.equal(f.get_tensor("x"), torch.arange(6.0))


def test_fsync_tree_is_bottom_up(tmp_path, monkeypatch):
    """Every file and directory under the tree is fsync'ed once, and a directory only after everything in it."""
    (tmp_path / "t" / "a" / "b").mkdir(parents=True)
    (tmp_path / "t" / "c").mkdir()
    for rel in ("top.bin", "a/x.bin", "a/b/y.bin", "c/z.bin"):
        (tmp_path / "t" / rel).write_bytes(b"1")
    order = []
    monkeypatch.setattr(atomic_files, "fsync_file", lambda p: order.append(os.path.relpath(p, tmp_path / "t")))
    monkeypatch.setattr(atomic_files, "fsync_dir", lambda p: order.append(os.path.relpath(p, tmp_path / "t") + "/"))
    atomic_files.fsync_tree(str(tmp_path / "t"))
    expected = {"top.bin", "a/x.bin", "a/b/y.bin", "c/z.bin", "./", "a/", "a/b/", "c/"}
    assert sorted(order) == sorted(expected)
    for i, entry in enumerate(order):
        if entry.endswith("/"):
            inside = [e for e in expected if e != entry and (entry == "./" or e.startswith(entry))]
            assert all(order.index(e) < i for e in inside), order


def test_append_jsonl_writes_utf8_not_escapes(tmp_path):
    path = tmp_path / "predictions.jsonl"
    atomic_files.append_jsonl(path, [{"id": "q1", "prediction": "café ☕"}, {"id": "q2", "prediction": "été"}])
    assert path.read_bytes() == ('{"id": "q1", "prediction": "café ☕"}\n{"id": "q2", "prediction": "été"}\n'
                                 ).encode("utf-8")


def test_write_jsonl_replaces_the_file_in_append_jsonls_format(tmp_path, monkeypatch):
    appended, written = tmp_path / "a.jsonl", tmp_path / "w.jsonl"
    records = [{"id": "q1", "prediction": "café ☕"}, {"id": "q2", "prediction": " A\n"}]
    atomic_files.append_jsonl(appended, records)
    written.write_text('{"id": "old"}\n')
    atomic_files.write_jsonl(written, records)
    assert written.read_bytes() == appended.read_bytes()
    interrupt = Interrupt(monkeypatch)
    with pytest.raises(OSError):
        atomic_files.write_jsonl(written, [{"id": "q3"}])
    assert interrupt.fired and written.read_bytes() == appended.read_bytes()  # old content whole, or the new
    assert leftovers(tmp_path) == []


def test_append_after_a_cut_line_keeps_every_whole_line(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_bytes(b'{"step": 8}\n{"step": 16}\n{"step": 24, "lo')  # the third append was cut by a crash
    atomic_files.append_jsonl(path, [{"step": 24}])
    assert path.read_bytes() == b'{"step": 8}\n{"step": 16}\n{"step": 24}\n'
    atomic_files.drop_cut_tail(path)  # nothing to cut: unchanged
    assert path.read_bytes() == b'{"step": 8}\n{"step": 16}\n{"step": 24}\n'


def test_read_jsonl_is_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """On a machine whose locale encoding is not UTF-8 (Windows' cp1252) an open() without an encoding would read
    UTF-8 text as mojibake; read_jsonl must not depend on the locale."""
    import builtins

    path = tmp_path / "predictions.jsonl"
    atomic_files.append_jsonl(path, [{"id": "q1", "prediction": "café"}])

    def cp1252_locale_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "cp1252"
        return builtins.open(file, mode, buffering, encoding, *args, **kwargs)

    monkeypatch.setattr(atomic_files, "open", cp1252_locale_open, raising=False)
    assert atomic_files.read_jsonl(path) == [{"id": "q1", "prediction": "café"}]


def test_read_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n\n   \n{"step": 2}\n')  # blank lines (e.g. from hand editing) in the middle
    assert atomic_files.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert atomic_files.read_jsonl(path, line_numbers=True) == [(1, {"step": 1}), (4, {"step": 2})]


def test_read_jsonl_corrupt_line_before_the_end_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    message = (f"{path}:2: not valid JSON (a corrupt line before the end; only a cut last line is recovered)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        atomic_files.read_jsonl(path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_usual_mode(tmp_path, umask):
    """mkstemp's private 0o600 must not leak into outputs (results others read): files get 0o666 less the umask,
    as open() gives them."""
    old = os.umask(umask)
    try:
        atomic_files.write_json(tmp_path / "a.json", {"x": 1})
        atomic_files.save_safetensors(tmp_path / "w.safetensors", {"t": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
