"""Training data: records, errors naming the record, skip-and-count, tokens/labels (parity with the processor),
collation of samples with different frame counts."""
from __future__ import annotations

import json
import os

import pytest
import torch

from geoalign.tiny import make_tokenizer  # noqa: E402

from geoalign.processing import GeoAlignProcessor  # noqa: E402
from geoalign.training.data import (GeoAlignCollator, GeoAlignSFTDataset, MissingMediaError,  # noqa: E402
                                    RecordError, load_records)
from geoalign.training.synthetic import make_colour_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    return make_colour_dataset(root, 6, frame_counts=(1, 2, 3), height=8), root


def _write(tmp_path, records, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(p)


def _ok(rid="r0", **kw):
    rec = {"id": rid, "video": "media/f001", "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                                 {"from": "gpt", "value": "A."}]}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("bad, match", [
    (dict(conversations=[]), "non-empty list"),
    (dict(conversations=[{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q"}]), "at least one human"),
    (dict(conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                         {"from": "gpt", "value": "B"}]), "alternate"),
    (dict(conversations=[{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]), "unknown speaker"),
    (dict(conversations=[{"from": "human"}, {"from": "gpt", "value": "A"}]), "string 'from' and 'value'"),
    (dict(images=["media/i002/0000.png"]), "exactly one of 'video' or 'images'"),
    (dict(video=""), "non-empty path"),
])
def test_malformed_records_name_the_id(synth, tmp_path, bad, match):
    _, root = synth
    path = _write(tmp_path, [_ok("good"), _ok("bad-7", **bad)])
    with pytest.raises(RecordError, match=rf"record 'bad-7': .*{match}"):
        load_records([path], root)
    recs, skipped = load_records([path], root, skip_bad=True)
    assert [r.id for r in recs] == ["good"] and list(skipped) == ["bad-7"]


def test_bad_json_line_and_missing_id(synth, tmp_path):
    _, root = synth
    path = _write(tmp_path, [_ok("good"), "{not json", json.dumps({"video": "media/f001"})])
    with pytest.raises(RecordError, match=r"d.jsonl:2.*invalid JSON"):
        load_records([path], root)
    recs, skipped = load_records([path], root, skip_bad=True)
    assert len(recs) == 1 and len(skipped) == 2 and any(k.endswith("d.jsonl:3") for k in skipped)


def test_missing_media(synth, tmp_path, tok):
    _, root = synth
    path = _write(tmp_path, [_ok("good"), _ok("gone", video="media/nope.mp4"),
                             {"id": "gone2", "images": ["media/i002/0000.png", "media/i002/9999.png"],
                              "conversations": _ok()["conversations"]}])
    with pytest.raises(MissingMediaError, match=r"record 'gone': media not found.*nope\.mp4"):
        load_records([path], root)
    assert isinstance(MissingMediaError("x", "y"), FileNotFoundError)
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root, skip_bad=True)
    assert len(ds) == 1 and set(ds.skipped) == {"gone", "gone2"}
    # media that vanish after loading the records: the error names the record
    recs, _ = load_records([_write(tmp_path, [_ok("late", video="media/f001")], "late.jsonl")], root)
    recs[0].media = os.path.join(root, "media/removed")
    with pytest.raises(MissingMediaError, match="record 'late'"):
        GeoAlignSFTDataset(recs, proc)[0]


def test_corrupt_media_error_and_skip(synth, tmp_path, tok):
    _, root = synth
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video at all" * 10)
    path = _write(tmp_path, [_ok("broken", video=str(bad)), _ok("good")])
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root)
    with pytest.raises(RecordError, match=r"record 'broken': cannot load media"):
        ds[0]
    ds = GeoAlignSFTDataset.from_files(path, proc, root, skip_bad=True)
    item = ds[0]                                     # replaced by the next good record, and counted
    assert item["id"] == "good" and list(ds.skipped) == ["broken"]


def test_max_length(synth, tok):
    path, root = synth
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root, max_length=20)
    with pytest.raises(RecordError, match="exceed max_length=20"):
        ds[0]


@pytest.mark.parametrize("G", [4, 8])
def test_collated_batch_equals_processor(synth, tok, G):
    path, root = synth
    proc = GeoAlignProcessor(tok, None, group_size=G, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root)
    items = [ds[0], ds[1], ds[3]]                    # 1, 2 and 1 frames; a video, a folder, a video
    assert [it["vggt_pixel_values"].shape[0] for it in items] == [1, 2, 1]
    batch = GeoAlignCollator.for_processor(proc)(items)
    assert batch.pop("ids") == ["sample000", "sample001", "sample003"]
    srcs = [os.path.join(root, "media/v000.mp4"), os.path.join(root, "media/f001"),
            os.path.join(root, "media/v003.mp4")]
    ans = ["It is red.", "It is green.", "It is yellow."]
    ref = proc(srcs, ["What colour is the scene?"] * 3, answer=ans)
    assert set(ref) == set(batch)
    for k, v in ref.items():
        if isinstance(v, list):
            assert all(torch.equal(a, b) for a, b in zip(batch[k], v)), k
        else:
            assert torch.equal(batch[k], v), k


def test_multi_turn_labels_cover_only_answers(synth, tok):
    path, root = synth
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root)
    it = ds[2]                                       # the multi-turn record (image list, 3 frames)
    sup = tok.decode(it["input_ids"][it["labels"] != -100])
    assert sup == "It is blue.<|im_end|>3 frames.<|im_end|>"
    text = tok.decode(it["input_ids"])
    assert text.count("<|im_start|>assistant\n") == 2 and text.endswith("3 frames.<|im_end|>")
    assert "<video>" not in text and "<|vision_start|>" + "<|image_pad|>" * 18 + "<|vision_end|>" in text
    # labels are aligned with the ids wherever they are set
    m = it["labels"] != -100
    assert torch.equal(it["labels"][m], it["input_ids"][m])


def test_json_list_file_and_system_turn(synth, tmp_path, tok):
    _, root = synth
    rec = _ok("s", conversations=[{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"},
                                  {"from": "gpt", "value": "A."}, {"from": "human", "value": "dangling"}])
    p = tmp_path / "d.json"
    p.write_text(json.dumps([rec]))
    recs, _ = load_records([str(p)], root)
    assert [r for r, _ in recs[0].turns] == ["system", "user", "assistant"]
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    it = GeoAlignSFTDataset(recs, proc)[0]
    assert tok.decode(it["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
