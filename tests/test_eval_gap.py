"""geoalign/eval/gap.py: the GAP benchmark's records (load_docs), prompt and per-sample metadata, the score's
layout and the printed table; the ScanRefer unique / multiple split and Scan2Cap's dense-captioning m@kIoU against
hand-computed cases, and `geoalign score gap` on a small predictions file. The end-to-end runs (`geoalign eval gap`
/ `geoalign score gap` on gap-data's own records) are tests/test_gap_finetune_data.py::test_eval_and_score_gap_tasks
(the oracle) and tests/test_gap_recipe.py (the fine-tuned tiny model); the box metrics, test_gap_boxes.py."""
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
    assert str(err.value) == (f"{path!r}: record 'rec7' is not a GAP detection / grounding / dense-caption record "
                              f"(metadata.task 'gap_caption')")
    with pytest.raises(ValueError) as err:  # a record that is not an object: named by its value, task None
        gap.load_docs(_write(tmp_path, [GROUNDING, "oops"]), "test")
    assert str(err.value) == (f"{path!r}: record 'oops' is not a GAP detection / grounding / dense-caption record "
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
    assert gap.score([]) == {"num_samples": 0, "detection": None, "grounding": None, "dense_caption": None}
    record = dict(id="gr0", prediction="lamp: [1, 2, 3, 0.5, 0.5, 1]", **gap.meta(GROUNDING))
    scores = gap.score([record])
    assert scores["num_samples"] == 1 and scores["detection"] is None
    assert scores["grounding"]["acc@0.25"] == scores["grounding"]["acc@0.5"] == 1.0
    assert scores["grounding"]["unique"] is None and scores["grounding"]["multiple"] is None  # a marker query


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


# ------------------------------------------------------------------------------ ScanRefer unique / multiple split
def _ground(rid, prediction, **extra) -> dict:
    return dict(id=rid, task="gap", prediction=prediction, gap_task="grounding", scene="s", answers=["x"],
                target={"label": "lamp", "center": [0, 0, 0], "size": [1, 1, 1]}, **extra)


HIT, MISS = "lamp: [0, 0, 0, 1, 1, 1]", "lamp: [5, 5, 5, 1, 1, 1]"


def test_grounding_unique_multiple_split():
    records = [_ground("u1", HIT, query="language", unique=True), _ground("u2", MISS, query="language", unique=True),
               _ground("m1", HIT, query="language", unique=False), _ground("k1", MISS)]   # k1: a marker query
    g = gap.score(records)["grounding"]
    assert (g["acc@0.25"], g["acc@0.5"], g["n"]) == (0.5, 0.5, 4)              # all four, the marker one included
    assert (g["unique"]["acc@0.25"], g["unique"]["n"]) == (0.5, 2)
    assert (g["multiple"]["acc@0.5"], g["multiple"]["n"]) == (1.0, 1)


def test_meta_carries_the_language_fields_only_when_present():
    doc = dict(GROUNDING, metadata=dict(GROUNDING["metadata"], query="language", unique=False))
    assert gap.meta(doc)["unique"] is False and gap.meta(doc)["query"] == "language"
    assert "unique" not in gap.meta(GROUNDING)


# ------------------------------------------------------------------------------------- Scan2Cap dense captioning
GT = [0, 0, 0, 1, 1, 1]
IOU_03 = [0, 0, 0, 1, 1, 1 / 0.3]          # nested, same centre: IoU = 1 / (1 / 0.3) = 0.3
IOU_05 = [0, 0, 0, 2, 1, 1]                # IoU exactly 0.5


def _cap(rid, object_id, prediction, references, prompt_box, box=GT) -> dict:
    return dict(id=rid, task="gap", prediction=prediction, gap_task="dense_caption", scene="scene0000_00",
                answers=references[:1], box=box, prompt_box=prompt_box, references=references, object_id=object_id)


CHAIR, TABLE = "the red chair", "a wooden table"


def _two_objects(prompt_a=IOU_03):
    return [_cap("a", 1, CHAIR, [CHAIR], prompt_a), _cap("b", 2, TABLE, [TABLE], GT)]


def test_dense_caption_gate_at_each_threshold():
    """Object a's proposal has IoU 0.3: its caption counts at 0.25 and is replaced by "sos eos" at 0.5 (Scan2Cap's
    check_candidates). Captions identical to their one reference: BLEU-4 and ROUGE-L 100 at 0.25. CIDEr per object:
    10 x mean over n of the cosine (1: identical vectors; "sos" / "eos" have IDF log(2/2) = 0) = 10, x100 -> 1000.
    At 0.5 a's "sos eos" has CIDEr 0 (no n-gram with IDF > 0), so the corpus mean halves; ROUGE-L of "sos eos"
    against "sos the red chair eos" is not 0: LCS 2, P = 1, R = 2/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P)."""
    c = gap.dense_caption_scores(_two_objects(), use_java=False)
    assert (c["n"], c["no_proposal"], c["style"]) == (2, 0, "scan2cap")
    assert c["@0.25"]["matched"] == 2 and c["@0.5"]["matched"] == 1
    assert c["@0.25"]["BLEU-4"] == pytest.approx(100, abs=1e-6)
    assert c["@0.25"]["ROUGE-L"] == pytest.approx(100)
    assert c["@0.25"]["CIDEr"] == pytest.approx(1000)
    assert c["@0.5"]["CIDEr"] == pytest.approx(500)
    f = (1 + 1.2 ** 2) * 1 * 0.4 / (0.4 + 1.2 ** 2 * 1)
    assert c["@0.5"]["ROUGE-L"] == pytest.approx(100 * (1 + f) / 2)
    assert c["@0.5"]["BLEU-4"] < 100
    assert "METEOR" not in c["@0.5"] and "Java" in c["meteor_missing_reason"]


def test_dense_caption_no_proposal_and_wrong_caption():
    c = gap.dense_caption_scores(_two_objects(prompt_a=None), use_java=False)
    assert c["no_proposal"] == 1 and c["@0.25"]["matched"] == 1 and c["@0.25"]["CIDEr"] == pytest.approx(500)
    wrong = [_cap("a", 1, "blue sofa", [CHAIR], GT), _cap("b", 2, "green lamp", [TABLE], GT)]
    assert gap.dense_caption_scores(wrong, use_java=False)["@0.5"]["CIDEr"] == 0.0


def test_dense_caption_styles_differ_on_the_threshold_and_the_text():
    """At IoU exactly 0.5 Scan2Cap's code (ious > min_iou) drops the caption, LEO's (iou >= 0.5) keeps it."""
    records = _two_objects(prompt_a=IOU_05)
    assert gap.dense_caption_scores(records, use_java=False)["@0.5"]["matched"] == 1
    leo = gap.dense_caption_scores(records, style="leo", use_java=False)
    assert leo["@0.5"]["matched"] == 2 and leo["@0.5"]["CIDEr"] == pytest.approx(1000)
    # LEO keeps punctuation other than "." and ",": "chair!" is not "chair"; the PTB stand-in drops it
    shout = [_cap("a", 1, "The red chair!", [CHAIR], GT), _cap("b", 2, TABLE, [TABLE], GT)]
    assert gap.dense_caption_scores(shout, use_java=False)["@0.5"]["ROUGE-L"] == pytest.approx(100)
    assert gap.dense_caption_scores(shout, style="leo", use_java=False)["@0.5"]["ROUGE-L"] < 100
    with pytest.raises(ValueError, match="unknown Scan2Cap style 'votenet'"):
        gap.score(records, scan2cap_style="votenet")


@pytest.mark.skipif(not __import__("geoalign.eval.caption", fromlist=["x"]).java_available(), reason="needs Java")
def test_dense_caption_with_java_ptb_and_meteor():
    records = [_cap("a", 1, "The red chair.", ["the red chair"], IOU_03), _cap("b", 2, TABLE, [TABLE], GT)]
    c = gap.dense_caption_scores(records, use_java=True)
    assert c["tokenizer"] == "ptb (java)" and c["@0.25"]["ROUGE-L"] == pytest.approx(100)
    assert c["@0.25"]["METEOR"] > c["@0.5"]["METEOR"] > 0    # "sos eos" still matches two words


def test_dense_caption_bad_records_are_named(tmp_path):
    no_refs = _cap("cap7", 1, CHAIR, [CHAIR], GT)
    del no_refs["references"]
    with pytest.raises(ValueError, match=r"dense-caption record 'cap7' needs references: .* got None"):
        gap.score([no_refs])
    with pytest.raises(ValueError, match=r"dense-caption record 'cap8' needs references: .* got \[\]"):
        gap.score([_cap("cap8", 1, CHAIR, [], GT)])
    with pytest.raises(ValueError, match=r"dense-caption record 'cap9': prompt_box must be a box"):
        gap.score([_cap("cap9", 1, CHAIR, [CHAIR], [1, 2, 3])])
    with pytest.raises(ValueError, match=r"records 'a' and 'a2' are the same object of one clip \(scene "
                                         r"'scene0000_00', frames None, object_id 1\)"):
        gap.score(_two_objects() + [_cap("a2", 1, CHAIR, [CHAIR], GT)])
    # the same object seen by two clips (each its own frame of reference) is two objects
    first, second = _cap("c1", 1, CHAIR, [CHAIR], GT), _cap("c2", 1, CHAIR, [CHAIR], GT)
    first["frame_ids"], second["frame_ids"] = [0, 5], [10, 15]
    assert gap.score([first, second])["dense_caption"]["n"] == 2
    doc = {"id": "dc1", "images": "media/s2", "conversations": [{"value": "Describe the object at [0, 0, 0, 1, 1, 1]."},
                                                                 {"value": CHAIR}],
           "metadata": {"task": "gap_dense_caption", "scene": "s", "box": GT, "prompt_box": GT, "object_id": 3}}
    path = str(tmp_path / "gap_test.json")
    with pytest.raises(ValueError, match=rf"^{path!r}: dense-caption record 'dc1' needs references"):
        gap.load_docs(_write(tmp_path, [DETECTION, doc]), "test")
    doc["metadata"]["references"] = [CHAIR, "a chair"]
    assert gap.load_docs(_write(tmp_path, [doc]), "test") == [doc]
    assert gap.meta(doc) == {"gap_task": "dense_caption", "scene": "s", "answers": [CHAIR], "box": GT,
                             "prompt_box": GT, "references": [CHAIR, "a chair"], "object_id": 3, "frame_ids": None}


def test_format_table_with_the_split_and_dense_captioning():
    scores = {"num_samples": 9, "detection": None,
              "grounding": {"acc@0.25": 0.5, "acc@0.5": 0.25, "n": 4, "malformed": 1,
                            "unique": {"acc@0.25": 1.0, "acc@0.5": 0.5, "n": 2, "malformed": 0}, "multiple": None},
              "dense_caption": {"n": 2, "no_proposal": 1, "style": "scan2cap", "tokenizer": "ptb (java)",
                                "@0.5": {"CIDEr": 50.0, "BLEU-4": 12.5, "ROUGE-L": 40.0, "matched": 1},
                                "@0.25": {"CIDEr": 60.0, "BLEU-4": 12.5, "ROUGE-L": 40.0, "matched": 1},
                                "meteor_missing_reason": "no Java"}}
    assert gap.format_table(scores) == (
        "GAP object-level tasks (9 questions)\n"
        "  3D grounding   Acc@0.25  50.00   Acc@0.5  25.00   (4 queries, 1 without a box)\n"
        "    unique       Acc@0.25 100.00   Acc@0.5  50.00   (2 queries)\n"
        "  3D dense captioning (2 objects, 1 without a proposal; scan2cap scoring, ptb (java) tokenizer)\n"
        "    @0.25IoU   CIDEr  60.00   BLEU-4  12.50   METEOR    n/a   ROUGE-L  40.00   (1 proposals pass)\n"
        "    @0.5IoU    CIDEr  50.00   BLEU-4  12.50   METEOR    n/a   ROUGE-L  40.00   (1 proposals pass)\n"
        "    (no Java)")


def test_score_gap_cli_from_the_predictions_file_alone(tmp_path, capsys):
    from geoalign.eval import cli

    det = dict(id="det0", task="gap", prediction="chair: [0, 0, 0, 1, 1, 1]", **gap.meta(DETECTION))
    records = [det, _ground("u1", HIT, query="language", unique=True), _ground("m1", MISS, query="language",
                                                                                  unique=False)] + _two_objects()
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "s.json"
    assert cli.main(["score", "gap", str(path), "--no-java", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP@0.25 100.00" in printed and "    unique       Acc@0.25 100.00" in printed
    assert "    @0.5IoU    CIDEr 500.00" in printed
    s = json.loads(out.read_text())
    assert s["grounding"]["acc@0.5"] == 0.5 and s["grounding"]["multiple"]["acc@0.25"] == 0.0
    assert s["dense_caption"]["@0.25"]["CIDEr"] == pytest.approx(1000) and s["dense_caption"]["style"] == "scan2cap"
    assert cli.main(["score", "gap", str(path), "--no-java", "--scan2cap-style", "leo", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dense_caption"]["style"] == "leo"
