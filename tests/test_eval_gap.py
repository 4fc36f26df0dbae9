"""geoalign/eval/gap.py: the GAP benchmark's records (load_docs), prompt and per-sample metadata, the score's
layout and the printed table. The end-to-end run (`geoalign eval gap` / `geoalign score gap` on gap-data's own
records) is tests/test_gap_finetune_data.py::test_eval_and_score_gap_tasks; the box metrics, test_gap_boxes.py."""
from __future__ import annotations

import json

import pytest

from geoalign.eval import gap

DETECTION = {"id": "det0", "images": "media/s0",
             "conversations": [{"from": "human", "value": "<image>\n\n  List the objects with their 3D boxes."},
                               {"from": "gpt", "value": "chair: [0, 0, 0, 1, 1, 1]"}],
             "metadata": {"task": "gap_detection", "scene": "scene0001_00",
                          "objects": [{"label": "chair", "center": [0, 0, 0], "size": [1, 1, 1]}]}}
GROUNDING = {"id": "gr0", "images": "media/s1",
             "conversations": [{"from": "human", "value": "Where is the lamp?\nAnswer with one box."},
                               {"from": "gpt", "value": "lamp: [1, 2, 3, 0.5, 0.5, 1]"}],
             "metadata": {"task": "gap_grounding", "scene": "scene0002_01",
                          "target": {"label": "lamp", "center": [1, 2, 3], "size": [0.5, 0.5, 1]}}}


def _write(tmp_path, docs) -> str:
    (tmp_path / "gap_test.json").write_text(json.dumps(docs))
    return str(tmp_path)


def test_load_docs_returns_the_records(tmp_path):
    assert gap.load_docs(_write(tmp_path, [DETECTION, GROUNDING]), "test") == [DETECTION, GROUNDING]


def test_load_docs_names_what_is_wrong(tmp_path):
    path = str(tmp_path / "gap_val.json")
    with pytest.raises(FileNotFoundError) as err:
        gap.load_docs(str(tmp_path), "val")
    assert str(err.value) == (f"GAP data not found: {path!r} (write it with `geoalign gap-data --task finetune "
                              f"--out {path}`)")
    path = str(tmp_path / "gap_test.json")
    with pytest.raises(ValueError) as err:
        gap.load_docs(_write(tmp_path, {"records": []}), "test")
    assert str(err.value) == f"{path!r} must hold a JSON list of records"
    caption = dict(DETECTION, id="rec7", metadata={"task": "gap_caption"})
    with pytest.raises(ValueError) as err:
        gap.load_docs(_write(tmp_path, [DETECTION, caption]), "test")
    assert str(err.value) == (f"{path!r}: record 'rec7' is not a GAP detection / grounding record "
                              f"(metadata.task 'gap_caption')")
    with pytest.raises(ValueError) as err:  # a record that is not an object: named by its value, task None
        gap.load_docs(_write(tmp_path, [GROUNDING, "oops"]), "test")
    assert str(err.value) == (f"{path!r}: record 'oops' is not a GAP detection / grounding record "
                              f"(metadata.task None)")
    with pytest.raises(ValueError, match=r"record 'det1' is .* \(metadata.task None\)"):  # no metadata at all
        gap.load_docs(_write(tmp_path, [{"id": "det1", "metadata": None}]), "test")


def test_prompt_is_the_question_without_the_image_placeholder():
    assert gap.prompt(DETECTION) == "\n  List the objects with their 3D boxes."  # only the placeholder line goes
    assert gap.prompt(GROUNDING) == "Where is the lamp?\nAnswer with one box."  # no placeholder: unchanged
    assert gap.prompt({"conversations": [{"value": "<image>\nA\nB"}]}) == "A\nB"


def test_meta_carries_what_scoring_needs():
    assert gap.meta(DETECTION) == {"gap_task": "detection", "scene": "scene0001_00",
                                   "answers": ["chair: [0, 0, 0, 1, 1, 1]"],
                                   "objects": DETECTION["metadata"]["objects"]}
    assert gap.meta(GROUNDING) == {"gap_task": "grounding", "scene": "scene0002_01",
                                   "answers": ["lamp: [1, 2, 3, 0.5, 0.5, 1]"],
                                   "target": GROUNDING["metadata"]["target"]}


def test_score_layout_without_records_of_a_task():
    assert gap.score([]) == {"num_samples": 0, "detection": None, "grounding": None}
    record = dict(id="gr0", prediction="lamp: [1, 2, 3, 0.5, 0.5, 1]", **gap.meta(GROUNDING))
    scores = gap.score([record])
    assert scores["num_samples"] == 1 and scores["detection"] is None
    assert scores["grounding"]["acc@0.25"] == scores["grounding"]["acc@0.5"] == 1.0


def test_format_table_exact():
    scores = {"num_samples": 7,
              "detection": {"mAP@0.25": 0.5, "mAP@0.5": 0.25, "num_scenes": 3, "malformed": 1},
              "grounding": {"acc@0.25": 0.75, "acc@0.5": 0.125, "n": 4, "malformed": 0}}
    assert gap.format_table(scores) == (
        "GAP object-level tasks (7 questions)\n"
        "  3D detection   mAP@0.25  50.00   mAP@0.5  25.00   (3 clips, 1 malformed lines)\n"
        "  3D grounding   Acc@0.25  75.00   Acc@0.5  12.50   (4 queries, 0 without a box)")
    assert gap.format_table({"num_samples": 0, "detection": None, "grounding": None}) == \
        "GAP object-level tasks (0 questions)"
