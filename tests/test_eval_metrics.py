"""Metric unit tests on hand-computed cases (VSI-Bench, SQA3D/ScanQA normalisation, COCO metrics)."""
import math

import numpy as np
import pytest

from geoalign.eval import caption, scanqa, sqa3d, vsibench
from geoalign.eval.textnorm import answer_match, clean_answer


# ----------------------------------------------------------------------------- VSI-Bench
def test_mra_thresholds_are_the_official_ten():
    assert len(vsibench.MRA_THRESHOLDS) == 10
    np.testing.assert_allclose(vsibench.MRA_THRESHOLDS, [0.5 + 0.05 * i for i in range(10)])


@pytest.mark.parametrize("pred, gt, expected", [
    ("2", "2", 1.0),
    ("3", "2", 0.1),      # rel 0.5 passes only theta=0.50 (0.5 <= 1 - 0.5)
    ("1", "2", 0.1),
    ("2.2", "2", 0.9),    # rel 0.1 passes 0.50..0.90 (float64 boundary at 0.90 included)
    ("1.9", "2", 1.0),    # rel 0.0500..04 <= 1 - 0.95 = 0.0500..04 (float64 boundary, as lmms-eval)
    ("2.5", "2", 0.6),    # rel 0.25 passes 0.50..0.75
    ("4", "2", 0.0),
    ("0.55", "0.5", 0.9),
    ("10", "100", 0.0),
])
def test_mra_boundaries(pred, gt, expected):
    # Exact equality on purpose: the value must be what the official float64 code yields.
    assert vsibench.mra_score(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_mra_boundary_floating_point_is_official():
    # Mathematically |2.2-2|/2 == 1-0.9, and the official float64 expression includes it.
    rel = abs(2.2 - 2.0) / 2.0
    assert rel > 0.1  # 0.10000000000000009
    assert rel <= 1 - vsibench.MRA_THRESHOLDS[8]
    assert vsibench.mean_relative_accuracy(2.2, 2.0) == 0.9


@pytest.mark.parametrize("pred", ["", "three", "about 3", "N/A", None, "1,000"])
def test_mra_unparsable_is_zero(pred):
    # "about 3": first token "about" is not a number -> 0, like the official fuzzy matching.
    assert vsibench.mra_score(pred, "3") == 0.0


def test_mra_parses_first_token_and_trailing_dot():
    assert vsibench.mra_score("3.", "3") == 1.0
    assert vsibench.mra_score("3 meters", "3") == 1.0
    assert vsibench.mra_score(" 3", "3") == 0.0  # official split(' ') -> first token is ''
    assert vsibench.mra_score("nan", "3") == 0.0
    assert vsibench.mra_score("inf", "3") == 0.0


@pytest.mark.parametrize("pred, gt, ok", [
    ("A.", "A", 1), ("a. front-left", "A", 1), ("B\n", "B", 1), ("b", "B", 1),
    ("C", "B", 0), ("A. B", "B", 0), ("The answer is B", "B", 0), ("", "A", 0),
    ("D..", "D", 1), ("(A)", "A", 0),
])
def test_mca_letter_parsing(pred, gt, ok):
    assert vsibench.parse_answer("a. front-left") == "a"
    assert vsibench.mca_accuracy(pred, gt) == ok


def test_vsibench_aggregation():
    recs = [
        # rel direction: easy 1/1, medium 0/1, hard 1/2 -> (100 + 0 + 50) / 3 = 50
        {"question_type": "object_rel_direction_easy", "prediction": "A", "ground_truth": "A"},
        {"question_type": "object_rel_direction_medium", "prediction": "B", "ground_truth": "A"},
        {"question_type": "object_rel_direction_hard", "prediction": "C.", "ground_truth": "C"},
        {"question_type": "object_rel_direction_hard", "prediction": "D", "ground_truth": "C"},
        {"question_type": "object_rel_distance", "prediction": "a", "ground_truth": "A"},      # 100
        {"question_type": "route_planning", "prediction": "B", "ground_truth": "A"},           # 0
        {"question_type": "obj_appearance_order", "prediction": "A", "ground_truth": "A"},     # 100
        {"question_type": "object_abs_distance", "prediction": "3", "ground_truth": "2"},      # 10
        {"question_type": "object_counting", "prediction": "2", "ground_truth": "2"},          # 100
        {"question_type": "object_counting", "prediction": "x", "ground_truth": "2"},          # 0 -> 50
        {"question_type": "object_size_estimation", "prediction": "2.5", "ground_truth": "2"},  # 60
        {"question_type": "room_size_estimation", "prediction": "2.2", "ground_truth": "2"},   # 90
    ]
    s = vsibench.score(recs)
    assert s["object_rel_direction"] == pytest.approx(50.0)
    assert s["object_counting"] == pytest.approx(50.0)
    assert s["object_abs_distance"] == pytest.approx(10.0)
    assert s["room_size_estimation"] == pytest.approx(90.0)
    expected = np.mean([50, 100, 0, 100, 10, 50, 60, 90])
    assert s["overall"] == pytest.approx(expected)
    assert s["num_samples"] == len(recs) and s["missing_tasks"] == []
    table = vsibench.format_table(s)
    assert "Avg." in table and "Rel. Dir." in table and f"{expected:.1f}" in table


def test_vsibench_partial_run_notes_missing_tasks():
    s = vsibench.score([{"question_type": "route_planning", "prediction": "A", "ground_truth": "A"}])
    assert s["overall"] == 100.0 and "object_counting" in s["missing_tasks"]
    assert "absent" in vsibench.format_table(s)


def test_vsibench_unknown_type_raises():
    with pytest.raises(ValueError):
        vsibench.score([{"question_type": "bogus", "prediction": "A", "ground_truth": "A"}])


def test_vsibench_prompts():
    na = {"question_type": "object_counting", "question": "How many chairs are there?"}
    assert vsibench.build_prompt(na) == ("These are frames of a video.\nHow many chairs are there?\n"
                                         "Please answer the question using a single word or phrase.")
    mca = {"question_type": "route_planning", "question": "Which way?", "options": ["A. left", "B. right"]}
    assert vsibench.build_prompt(mca) == ("These are frames of a video.\nWhich way?\nOptions:\nA. left\nB. right\n"
                                          "Answer with the option's letter from the given choices directly.")


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("raw, clean", [
    ("Chair", "chair"),
    ("  brown   chair  ", "brown chair"),
    ("The table.", "table"),
    ("a chair", "chair"),
    ("an apple", "apple"),
    ("it is a", "it is a"),         # article only dropped before a word
    ("2", "two"), ("0", "zero"), ("none", "zero"), ("20", "twenty"), ("23", "twenty-three"),
    ("21", "21"),                   # only the listed numbers are spelled out
    ("12 o'clock", "twelve o'clock"), ("oclock", "o'clock"),
    ("letf", "left"), ("rigth", "right"), ("behine", "behind"), ("tehre", "there"),
    ("tv", "TV"), ("chai", "chair"),
    ("no1", "no"),                  # trailing digit on a word removed
    ("backwards", "backward"),
    ("left, right", "left, right"), # comma, hyphen, colon and apostrophe are kept
    ("black-and-white!", "black-and-white"),
    ("(yes)", "yes"),
])
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_answer_match_em_and_refined():
    assert answer_match("chair", ["chair", "seat"]) == (1, 1)
    assert answer_match("brown chair", ["chair"]) == (0, 1)        # ref inside prediction
    assert answer_match("chair", ["brown chair"]) == (0, 1)        # prediction inside ref
    assert answer_match("coffeetable", ["coffee table"]) == (0, 1)  # spaces ignored
    assert answer_match("table", ["chair"]) == (0, 0)
    assert answer_match("", ["chair"]) == (0, 0)                   # empty never matches


def test_sqa3d_score_em_refined_and_types():
    recs = [
        {"prediction": "Two.", "answers": ["2"], "question_type": "how"},            # EM
        {"prediction": "the left", "answers": ["left"], "question_type": "which"},   # EM (article)
        {"prediction": "left side", "answers": ["left"], "question_type": "which"},  # refined only
        {"prediction": "yes", "answers": ["no"], "question_type": "is"},             # wrong
    ]
    s = sqa3d.score(recs)
    assert s["EM-1"] == pytest.approx(50.0)
    assert s["EM-1-refined"] == pytest.approx(75.0)
    assert s["per_type"] == {"is": 0.0, "how": 100.0, "which": 50.0}
    table = sqa3d.format_table(s)
    assert "EM-1-refined" in table and "50.0" in table


def test_sqa3d_question_type():
    assert sqa3d.question_type("What is on my left?") == "what"
    assert sqa3d.question_type(" Is the door open?") == "is"
    assert sqa3d.question_type("Which way should I go?") == "which"
    assert sqa3d.question_type("Where is the sofa?") == "others"


# ----------------------------------------------------------------------------- COCO metrics
def test_simple_tokenizer():
    assert caption.simple_tokenize("Brown, wooden chair.") == "brown wooden chair"
    assert caption.simple_tokenize("twelve o'clock: left-side") == "twelve o'clock left-side"


def test_caption_scores_hand_computed_no_java():
    # pred "brown chair" vs ref "brown wooden chair": unigram precision 1, brevity penalty
    # exp(1 - 3/2); ROUGE-L: LCS 2, P = 1, R = 2/3, F_beta(1.2) = (1+b^2)PR / (R + b^2 P).
    s = caption.caption_scores({"q": ["brown wooden chair"]}, {"q": "brown chair"}, use_java=False)
    assert s["BLEU-1"] == pytest.approx(100 * math.exp(-0.5), rel=1e-6)
    b2 = 1.2 ** 2
    assert s["ROUGE-L"] == pytest.approx(100 * (1 + b2) * (2 / 3) / (2 / 3 + b2), rel=1e-6)
    assert "METEOR" not in s and "Java" in s["meteor_missing_reason"]
    assert s["tokenizer"].startswith("simple")


def test_caption_scores_identical_no_java():
    refs = {"a": ["a brown wooden chair near the door"], "b": ["two white tables by the window"]}
    preds = {"a": "a brown wooden chair near the door", "b": "two white tables by the window"}
    s = caption.caption_scores(refs, preds, use_java=False)
    for k in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert s[k] == pytest.approx(100.0, rel=1e-6)
    assert s["CIDEr"] == pytest.approx(1000.0, rel=1e-6)  # CIDEr-D max is 10 (x100)


def test_scanqa_score_uses_all_references_and_cleaning():
    recs = [{"id": "1", "prediction": "The brown chair.", "answers": ["table", "brown chair"]},
            {"id": "2", "prediction": "window", "answers": ["curtain"]}]
    s = scanqa.score(recs, use_java=False)
    assert s["EM@1"] == pytest.approx(50.0) and s["EM@1-refined"] == pytest.approx(50.0)
    assert s["num_samples"] == 2 and 0 < s["BLEU-1"] <= 100
    table = scanqa.format_table(s)
    assert "EM@1" in table and "CIDEr" in table and "METEOR" in table and "n/a" in table
    assert "NOTE: METEOR not computed" in table


@pytest.mark.skipif(not caption.java_available(), reason="METEOR and the PTB tokenizer need Java")
def test_caption_scores_with_java_meteor():
    refs = {"a": ["brown wooden chair"], "b": ["white table"], "c": ["left"]}
    preds = {"a": "brown wooden chair", "b": "table", "c": ""}
    s = caption.caption_scores(refs, preds, use_java=True)
    assert s["tokenizer"].startswith("ptb")
    assert "meteor_missing_reason" not in s
    assert 0.0 < s["METEOR"] < 100.0
    # PTB tokenisation of these lower-case, punctuation-free answers equals the Python one.
    s2 = caption.caption_scores(refs, preds, use_java=False)
    for k in ("BLEU-1", "ROUGE-L", "CIDEr"):
        assert s[k] == pytest.approx(s2[k], rel=1e-9)
