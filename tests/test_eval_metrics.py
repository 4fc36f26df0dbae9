"""Metric unit tests on hand-computed cases (VSI-Bench, SQA3D/ScanQA normalisation, COCO metrics)."""
import functools
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import warnings

import numpy as np
import pytest

from geoalign.eval import caption, scanqa, sqa3d, textnorm, vsibench
from geoalign.eval.textnorm import answer_match, clean_answer, strip_special


def read_table(text):
    """(title, {header: cell}, lines after the table) of a ``format_table`` text, checking that its header,
    rule and value rows line up: columns separated by ' | ' (rule: '-+-'), each as wide as its rule segment,
    header and value right-aligned in it."""
    lines = text.split("\n")
    title, head, rule, row, rest = lines[0], lines[1], lines[2], lines[3], lines[4:]
    segments = rule.split("-+-")
    assert all(seg and set(seg) == {"-"} for seg in segments), rule
    widths = [len(seg) for seg in segments]
    heads, cells = head.split(" | "), row.split(" | ")
    assert [len(h) for h in heads] == widths and [len(c) for c in cells] == widths, (head, rule, row)
    for field in heads + cells:
        assert field == field.strip().rjust(len(field)), f"{field!r} is not right-aligned"
    return title, {h.strip(): c.strip() for h, c in zip(heads, cells)}, rest


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
    ("1", "1", 1.0),
])
def test_mra_boundaries(pred, gt, expected):
    # Exact equality on purpose: the value must be what the official float64 code yields.
    assert vsibench.mra_score(pred, gt) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("parsing", vsibench.PARSINGS)
def test_mra_zero_ground_truth_scores_zero_like_the_official_division(parsing):
    # Never in VSI-Bench. The official |pred - gt| / gt divides by the 0 (Python floats: ZeroDivisionError, the run
    # stops); evaluated in float64 it is 1 / 0 = inf for a prediction 1 and 0 / 0 = nan for a prediction 0, and
    # neither inf <= 1 - t nor nan <= 1 - t holds for any of the 10 thresholds: MRA 0, the exact 0 included
    with np.errstate(divide="ignore", invalid="ignore"):
        assert 1.0 / np.float64(0.0) == np.inf and np.isnan(np.float64(0.0) / np.float64(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's divide / invalid warnings are not raised either
        assert vsibench.mra_score("0", "0", parsing) == 0.0
        assert vsibench.mra_score("0.", "0.0", parsing) == 0.0
        assert vsibench.mra_score("1", "0", parsing) == 0.0
        assert vsibench.mean_relative_accuracy(0.0, 0.0) == 0.0
        s = vsibench.score([{"question_type": "object_counting", "prediction": "0", "ground_truth": "0"},
                            {"question_type": "object_counting", "prediction": "2", "ground_truth": "2"}], parsing)
    assert s["object_counting"] == 50.0 and s["overall"] == 50.0   # (0 + 100) / 2


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
    ("BX", "B", 0),  # only trailing '.' is stripped, nothing else
])
def test_mca_letter_parsing(pred, gt, ok):
    assert vsibench.parse_answer("a. front-left") == "a"
    assert vsibench.mca_accuracy(pred, gt) == ok


def test_vsibench_parsing_modes():
    # official (thinking-in-space = lmms-eval <= 0.7.2, the default) parses results[0] as it is:
    # " A".split(" ")[0] == "" -> wrong; stripped strips first; lmms-eval-0.7.3 reads numbers with extract_number
    recs = [{"question_type": "route_planning", "prediction": " A", "ground_truth": "A"},
            {"question_type": "object_counting", "prediction": " 3", "ground_truth": "3"},
            {"question_type": "object_counting", "prediction": "three", "ground_truth": "3"},
            {"question_type": "object_size_estimation", "prediction": "3.5m", "ground_truth": "3.5"},
            {"question_type": "object_abs_distance", "prediction": "2.2\n", "ground_truth": "2"}]  # same for all
    official, stripped, lmms = (vsibench.score(recs, parsing) for parsing in
                                ("official", "stripped", "lmms-eval-0.7.3"))
    assert vsibench.score(recs) == official                                  # the default
    # route_planning: official "" != "A"; stripped "A"; 0.7.3 reads letters as official -> 0
    assert (official["route_planning"], stripped["route_planning"], lmms["route_planning"]) == (0.0, 100.0, 0.0)
    # counting " 3" / "three": official float("") and float("three") fail -> 0, 0; stripped 3 -> 100, "three" 0;
    # 0.7.3 reads 3 and 3 -> 100, 100
    assert (official["object_counting"], stripped["object_counting"], lmms["object_counting"]) == (0.0, 50.0, 100.0)
    # "3.5m": float("3.5m") fails -> 0 (official, stripped); 0.7.3 reads 3.5 == 3.5 -> 100
    assert [s["object_size_estimation"] for s in (official, stripped, lmms)] == [0.0, 0.0, 100.0]
    # "2.2\n".split(" ")[0].rstrip(".").strip() == "2.2": |2.2 - 2| / 2 = 0.1 passes 9 of 10 thresholds
    assert [s["object_abs_distance"] for s in (official, stripped, lmms)] == [pytest.approx(90.0)] * 3
    assert [s["parsing"] for s in (official, stripped, lmms)] == ["official", "stripped", "lmms-eval-0.7.3"]
    assert vsibench.format_table(official).startswith("VSI-Bench (MCA: accuracy, NA: MRA; x100)\n")
    assert vsibench.format_table(stripped).startswith("VSI-Bench (MCA: accuracy, NA: MRA; x100, answers stripped "
                                                      "before the official parsing)\n")
    assert vsibench.format_table(lmms).startswith("VSI-Bench (MCA: accuracy, NA: MRA; x100, NA numbers read as "
                                                  "lmms-eval 0.7.3)\n")
    assert vsibench.format_table(dict(official, subset="debiased")).startswith("VSI-Bench-Debiased (")
    with pytest.raises(ValueError, match=r"unknown VSI-Bench parsing 'raw'; expected one of \('official', "
                                         r"'lmms-eval-0.7.3', 'stripped'\)"):
        vsibench.score(recs, "raw")


@pytest.mark.parametrize("answer, number", [
    # lmms-eval 0.7.3 extract_number (PR #1386), each worked out by hand from its code: the text stripped and
    # lower-cased; the first regex match -?\d+(?:\.\d+)? or the first run of number words, whichever starts first
    ("3", 3.0), ("3.0", 3.0), ("There are 3 boxes", 3.0), ("3.5m", 3.5), ("-3", -3.0),
    ("1e2", 1.0),                       # no exponent in the pattern: "1", then "e2" is not part of it
    ("1.5e3", 1.5), (".5", 5.0), ("1,000", 1.0), ("3.", 3.0),
    ("three", 3.0), ("Three boxes.", 3.0), ("  TWELVE  ", 12.0), ("about twelve feet", 12.0),
    ("twenty-one", 21.0),               # [a-z]+ runs "twenty", "one": the hyphen is passed over, 20 + 1
    ("three hundred and twenty-one", 321.0),   # (0 + 3) * 100 = 300, "and" skipped, + 20 + 1
    ("a hundred", 100.0),               # "a" is no number word; "hundred" alone: max(0, 1) * 100
    ("one thousand two hundred", 1200.0),      # 1 -> total 1000, current 0; 2 -> 2 * 100 = 200
    ("twenty one and two", 23.0),       # one run: 20 + 1 + 2
    ("five and a half", 5.0),           # "a" ends the run
    ("one apple, room 2", 1.0),         # the word comes first
    ("room 2, one apple", 2.0),         # the digit comes first
    ("2 thousand", 2.0),
    ("someone", None),                  # "someone" is one [a-z]+ run, not "one"
    ("none", None), ("no chairs", None), ("", None), ("   ", None), (None, None),
])
def test_lmms_eval_073_number(answer, number):
    assert vsibench.lmms_eval_073_number(answer) == number
    got = vsibench.parse_number(answer, "lmms-eval-0.7.3")
    assert got == number and (got is None or type(got) is float)


def test_lmms_eval_073_scores_numbers_and_letters():
    na, mca = "object_counting", "obj_appearance_order"
    lmms = functools.partial(vsibench.score_sample, parsing="lmms-eval-0.7.3")
    assert lmms(na, "three", "3") == 1.0 and lmms(na, "3.5m", "3.5") == 1.0
    assert lmms(na, "I count 4 chairs", "2") == 0.0          # |4 - 2| / 2 = 1 fails every threshold
    assert lmms(na, "1e2", "100") == 0.0                      # reads 1: |1 - 100| / 100 = 0.99
    assert lmms(na, "1e2", "1") == 1.0
    # reads 2 ("point" ends the run): |2 - 2.5| / 2.5 = 0.2 passes t = .5 .. .75, 6 of 10 (at .8 the float64
    # 1 - 0.8 = 0.19999999999999996 is below 0.2)
    assert lmms(na, "two point five", "2.5") == pytest.approx(0.6, abs=1e-15)
    assert lmms(na, "two point five", "2") == 1.0
    assert lmms(na, "nothing here", "2") == 0.0               # no number: 0 (upstream's TypeError -> worst case)
    # letters: the official fuzzy_matching on the raw answer
    assert lmms(mca, "B. the lamp", "B") == 1.0 and lmms(mca, "b", "B") == 1.0
    assert lmms(mca, " B", "B") == 0.0 and lmms(mca, "The answer is B", "B") == 0.0
    assert vsibench.score_sample(mca, " B", "B", "stripped") == 1.0


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
    # the per-type breakdown keeps the three direction sub-types apart, with their sample counts
    assert s["per_type"]["object_rel_direction_hard"] == pytest.approx(50.0)
    assert s["per_type"]["object_rel_direction_medium"] == 0.0 and s["per_type"]["object_counting"] == 50.0
    assert s["counts"] == {qt: 2 if qt in ("object_rel_direction_hard", "object_counting") else 1
                           for qt in vsibench.MCA_QUESTION_TYPES + vsibench.NA_QUESTION_TYPES}
    table = vsibench.format_table(s)
    assert "Avg." in table and "Rel. Dir." in table and f"{expected:.1f}" in table
    title, row, rest = read_table(table)
    assert title.startswith("VSI-Bench") and "MCA: accuracy, NA: MRA; x100" in title
    assert list(row) == [h for _, h in vsibench.TABLE_COLUMNS]
    assert row == {h: f"{s[k]:.1f}" for k, h in vsibench.TABLE_COLUMNS}
    assert row["Avg."] == f"{expected:.1f}" and row["Rel. Dir."] == "50.0" and row["Obj. Count"] == "50.0"
    # then, after a blank line, one line per question type: name, mean (2 decimals), sample count
    assert rest[:2] == ["", "per question type:"]
    breakdown = [re.fullmatch(r"  (\S+) +(\d+\.\d\d)  \(n=(\d+)\)", line).groups() for line in rest[2:]]
    assert [qt for qt, _, _ in breakdown] == list(vsibench.MCA_QUESTION_TYPES + vsibench.NA_QUESTION_TYPES)
    assert {qt: (float(v), int(n)) for qt, v, n in breakdown} == {
        qt: (round(s["per_type"][qt], 2), s["counts"][qt]) for qt in s["per_type"]}


def test_vsibench_partial_run_notes_missing_tasks():
    s = vsibench.score([{"question_type": "route_planning", "prediction": "A", "ground_truth": "A"},
                        {"question_type": "object_counting", "prediction": "4", "ground_truth": "4"}])
    assert s["overall"] == 100.0 and "object_abs_distance" in s["missing_tasks"]
    table = vsibench.format_table(s)
    assert "absent" in table
    _, row, rest = read_table(table)
    assert row["Avg."] == row["Route Plan"] == row["Obj. Count"] == "100.0"
    assert {h for h, c in row.items() if c == "-"} == {h for k, h in vsibench.TABLE_COLUMNS if k in s["missing_tasks"]}
    # the note lists exactly the absent tasks and says what 'Avg.' then means
    (note,) = [line for line in rest if line.startswith("NOTE:")]
    listed = note.split("predictions: ", 1)[1].split("; ", 1)[0]
    assert listed.split(", ") == s["missing_tasks"]
    assert "'Avg.' is over the present tasks only" in note


def test_vsibench_empty_run_has_no_average_and_no_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's "Mean of empty slice"
        s = vsibench.score([])
        table = vsibench.format_table(s)
    assert math.isnan(s["overall"]) and s["num_samples"] == 0 and s["per_type"] == {} and s["counts"] == {}
    assert s["missing_tasks"] == list(vsibench.TASKS)
    _, row, _ = read_table(table)
    assert set(row.values()) == {"-"}


def test_vsibench_table_of_published_numbers():
    # format_table also lays out a bare dict of paper columns (e.g. a published row to compare with)
    _, row, rest = read_table(vsibench.format_table({"overall": 45.0, "route_planning": 30.5}))
    assert row["Avg."] == "45.0" and row["Route Plan"] == "30.5" and row["Obj. Count"] == "-"
    assert rest == ["", "per question type:"]
    _, _, rest = read_table(vsibench.format_table({"per_type": {"route_planning": 30.5}}))
    assert rest[2].split()[:2] == ["route_planning", "30.50"]


def test_vsibench_unknown_type_raises():
    with pytest.raises(ValueError, match="'bogus'"):
        vsibench.score([{"question_type": "bogus", "prediction": "A", "ground_truth": "A"}])
    with pytest.raises(ValueError, match="'bogus'"):
        vsibench.build_prompt({"question_type": "bogus", "question": "?"})


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
    assert answer_match("coffee table", ["coffeetable"]) == (0, 1)  # spaces ignored in the prediction too
    assert answer_match("brown wooden chair", ["wooden chair"]) == (0, 1)


def test_leo_answer_match_is_leos_loop():
    # LEO (evaluator/scanqa_eval.py answer_match): references in order, the first that equals the prediction
    # (1, 1) or is a space-free substring of it / has it as one (0, 1) decides
    assert textnorm.leo_answer_match("brown", ["brown wooden", "brown"]) == (0, 1)  # exact-first: (1, 1)
    assert answer_match("brown", ["brown wooden", "brown"]) == (1, 1)
    assert textnorm.leo_answer_match("brown", ["brown", "brown wooden"]) == (1, 1)
    assert textnorm.leo_answer_match("coffeetable", ["chair", "coffee table"]) == (0, 1)
    assert textnorm.leo_answer_match("table", ["chair"]) == (0, 0)
    assert textnorm.leo_answer_match("", ["chair"]) == (0, 1)                         # "" is in every string
    assert answer_match("", ["chair"]) == (0, 0)
    assert textnorm.leo_answer_match("", []) == (0, 0)


def test_scanqa_reports_both_em_rules():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    recs = [{"id": "1", "prediction": "Brown.", "answers": ["brown wooden", "brown"]},  # exact-first 1/1, LEO 0/1
            {"id": "2", "prediction": "", "answers": ["sofa"]},                       # exact-first 0/0, LEO 0/1
            {"id": "3", "prediction": "the table", "answers": ["table", "desk"]},       # both 1/1
            {"id": "4", "prediction": "lamp", "answers": ["window"]}]                   # both 0/0
    s = scanqa.score(recs, use_java=False, meteor=False)
    assert (s["EM@1"], s["EM@1-refined"]) == (50.0, 50.0)
    assert (s["EM@1-LEO"], s["EM@1-refined-LEO"]) == (25.0, 75.0)
    assert scanqa.format_table(s).split("\n")[5] == ("LEO's rule (first matching reference decides): EM@1-LEO 25.0, "
                                                      "EM@1-refined-LEO 75.0")


# Each answer is its own reference. LEO cleans prediction and references with one function, so identical text
# always matches there; here both go through normalize_answer. With the whitespace squeezed in the prediction only,
# the first four and "two\n" scored EM 0 ("brown\nchair" was "brown chair" against the reference "brown\nchair"),
# and "" scored 0 as an empty prediction; the others are guards.
@pytest.mark.parametrize("answer", ["brown\nchair", " brown chair\r\n", "brown\t\tchair", "left\u00a0\u00a0side",
                                    "brown\tchair", "brown\u00a0chair", "left\u2003side", "two\n", "The Table.", ""])
def test_em_answer_identical_to_its_reference_always_matches(answer):
    recs = [{"id": "1", "prediction": answer, "answers": [answer, "sofa"], "question_type": "what"}]
    s = scanqa.score(recs, use_java=False, meteor=False)
    assert (s["EM@1"], s["EM@1-refined"], s["EM@1-LEO"], s["EM@1-refined-LEO"]) == (100.0,) * 4
    assert sqa3d.score(recs)["EM-1"] == 100.0
    assert textnorm.normalize_answer(answer) == clean_answer(" ".join(answer.split()))
    if "\n" not in answer.strip():                     # vg-llm scores the first line only
        assert sqa3d.score(recs, style="vg-llm")["EM-1"] == 100.0


def test_whitespace_is_normalised_alike_in_prediction_and_references():
    # every run of whitespace is one space, ends trimmed; then LEO's clean_answer
    assert textnorm.normalize_whitespace(" a\t\tb\u00a0c\r\nd  e\u2003") == "a b c d e"
    assert textnorm.normalize_answer("The\u00a0brown\n chair.") == "brown chair"
    assert textnorm.normalize_answer("ASSISTANT: two</s>") == "two"
    # the prediction "brown chair" against the reference "brown\nchair": one answer (the old path gave 0)
    s = scanqa.score([{"id": "1", "prediction": "brown chair", "answers": ["brown\nchair"]}], use_java=False,
                     meteor=False)
    assert s["EM@1"] == 100.0 and s["EM@1-LEO"] == 100.0


def test_em_empty_prediction_matches_an_empty_reference_as_leo():
    # LEO's answer_match tests pred == gt first: two empty (cleaned) strings are an exact match
    assert answer_match("", [""]) == (1, 1)
    assert answer_match("", ["chair", ""]) == (1, 1)                     # exact-first: the equal reference
    assert answer_match("", ["chair"]) == (0, 0)                         # still no refined match for ""
    assert textnorm.leo_answer_match("", [""]) == (1, 1)
    assert textnorm.leo_answer_match("", ["chair", ""]) == (0, 1)        # LEO: "chair" first, "" is in it
    # through the scorers: "" against "" and "?" against "!" (both clean to "") are exact matches
    recs = [{"id": "1", "prediction": "", "answers": [""], "question_type": "what"},
            {"id": "2", "prediction": "?", "answers": ["!"], "question_type": "what"},
            {"id": "3", "prediction": "", "answers": ["sofa"], "question_type": "what"}]    # (0, 0); LEO (0, 1)
    s = scanqa.score(recs, use_java=False, meteor=False)
    assert (s["EM@1"], s["EM@1-refined"]) == (pytest.approx(200 / 3), pytest.approx(200 / 3))
    assert (s["EM@1-LEO"], s["EM@1-refined-LEO"]) == (pytest.approx(200 / 3), 100.0)
    assert sqa3d.score(recs)["EM-1"] == pytest.approx(200 / 3)


def test_typo_and_number_rules_apply_to_whole_words_only():
    # every typo / number-word rule is built by _word: "let" -> "left" must leave "letter", "outlet" alone
    assert textnorm._word("let").sub("left", "let the letter by the outlet") == "left the letter by the outlet"
    assert textnorm._word("2").sub("two", "2 of 12, 2nd") == "two of 12, 2nd"
    assert clean_answer("let of the outlet") == "left of outlet"


@pytest.mark.parametrize("raw, stripped", [
    ("ASSISTANT: chair", "chair"),
    ("chair<|im_end|>", "chair"),
    ("table<|endoftext|>", "table"),
    ("<s> sofa </s>", "sofa"),
    ("left <unk> side", "left side"),   # the space left behind is squeezed
    ("left\nside\n", "left side"),      # a multi-line answer is one line
    ("  brown \n\n chair ", "brown chair"),
])
def test_strip_special_removes_chat_template_leftovers(raw, stripped):
    assert strip_special(raw) == stripped


def test_multiline_and_templated_answers_match_their_reference():
    recs = [{"prediction": "ASSISTANT: left\nside<|im_end|>", "answers": ["left side"], "question_type": "what"}]
    assert sqa3d.score(recs)["EM-1"] == 100.0


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


def test_sqa3d_score_counts_and_types_from_questions():
    recs = [
        # no prediction: wrong, even though the text "None" would normalise to this answer ("zero")
        {"answers": ["0"], "question_type": "how"},
        # no prediction against a reference that normalises to nothing: "" == "", an exact match (LEO: pred == gt)
        {"answers": ["?"], "question": "What is behind me?"},
        {"prediction": "yes", "answers": ["yes"], "question": "Can I see the door from here?"},
        {"prediction": "left", "answers": ["left"]},  # neither type nor question: "others"
    ]
    s = sqa3d.score(recs)
    assert s["EM-1"] == 75.0 and s["EM-1-refined"] == 75.0 and s["num_samples"] == 4
    assert s["per_type"] == {"what": 100.0, "how": 0.0, "can": 100.0, "others": 100.0}
    assert s["counts"] == {"what": 1, "how": 1, "can": 1, "others": 1}


def test_sqa3d_vg_llm_style_scores_the_first_line():
    # VG-LLM sqa3d_process_results: clean_answer(pred.strip().split("\n")[0]) == clean_answer(answer)
    assert sqa3d.parse_prediction("  left\nside\n", "vg-llm") == "left"
    assert sqa3d.parse_prediction("  left\nside\n") == "left side"               # default: lines joined
    assert sqa3d.parse_prediction("\nTwo.\nbecause", "vg-llm") == "two"          # stripped before the split
    recs = [{"prediction": "yes\nThe door is open.", "answers": ["yes"], "question_type": "is"},
            {"prediction": "left\nside", "answers": ["left side"], "question_type": "which"}]
    default, vg = sqa3d.score(recs), sqa3d.score(recs, style="vg-llm")
    assert (default["EM-1"], vg["EM-1"]) == (50.0, 50.0)
    assert default["per_type"] == {"is": 0.0, "which": 100.0} and vg["per_type"] == {"is": 100.0, "which": 0.0}
    assert (default["style"], vg["style"]) == ("default", "vg-llm")
    assert "VG-LLM parsing: first line of the answer" in sqa3d.format_table(vg).split("\n")[0]
    assert "VG-LLM" not in sqa3d.format_table(default)
    with pytest.raises(ValueError, match=r"unknown SQA3D style 'leo'; expected one of \('default', 'vg-llm'\)"):
        sqa3d.score(recs, style="leo")


def test_sqa3d_vg_llm_prompt():
    doc = {"situation": "I am sitting on the sofa.", "question": "What is in front of me?"}
    # VG-LLM sqa3d_doc_to_text: "\n".join([pre_prompt, situation + " " + question, post_prompt]), sqa3d.yaml prompts
    assert sqa3d.build_prompt(doc, style="vg-llm") == (
        "Carefully watch the video and answer the question.\n"
        "I am sitting on the sofa. What is in front of me?\n"
        "Please answer the question using a single word or phrase.")
    assert sqa3d.build_prompt(doc) == ("I am sitting on the sofa. What is in front of me? "
                                       "Answer the question using a single word or phrase.")
    assert sqa3d.build_prompt(doc, "", "vg-llm") == ("Carefully watch the video and answer the question.\n"
                                                     "I am sitting on the sofa. What is in front of me?")


def test_sqa3d_nothing_to_score():
    with pytest.raises(ValueError, match="no SQA3D predictions"):
        sqa3d.score([])


def test_sqa3d_table_layout():
    s = sqa3d.score([{"prediction": "two", "answers": ["2"], "question_type": "how"},
                     {"prediction": "no", "answers": ["yes"], "question_type": "is"}])
    title, row, rest = read_table(sqa3d.format_table(s))
    assert f"n={s['num_samples']}" in title
    assert row == {"What": "-", "Is": "0.0", "How": "100.0", "Can": "-", "Which": "-", "Others": "-",
                   "Avg. (EM-1)": "50.0"}
    assert len(rest) == 1 and rest[0].startswith("EM-1-refined") and rest[0].endswith(f": {s['EM-1-refined']:.1f}")


def test_sqa3d_question_type():
    assert sqa3d.question_type("What is on my left?") == "what"
    assert sqa3d.question_type(" Is the door open?") == "is"
    assert sqa3d.question_type("How many chairs are there?") == "how"
    assert sqa3d.question_type("Can I reach the lamp?") == "can"
    assert sqa3d.question_type("Which way should I go?") == "which"
    assert sqa3d.question_type("Where is the sofa?") == "others"


def test_prompt_suffix_can_be_dropped():
    # --prompt-suffix "" gives the bare question (no trailing space)
    assert scanqa.build_prompt({"question": " What color is the chair? "}, suffix="") == "What color is the chair?"
    assert sqa3d.build_prompt({"situation": "I sit on the bed. ", "question": "What is left of me?"},
                              suffix="") == "I sit on the bed. What is left of me?"


# ----------------------------------------------------------------------------- COCO metrics
def test_simple_tokenizer():
    assert caption.simple_tokenize("Brown, wooden chair.") == "brown wooden chair"
    assert caption.simple_tokenize("twelve o'clock: left-side") == "twelve o'clock left-side"
    # PTB turns quotes into `` / '' tokens that pycocoevalcap then drops; a line break is a space
    assert caption.simple_tokenize("the 'left' side") == "the left side"
    assert caption.simple_tokenize("'' chair") == "chair"
    assert caption.simple_tokenize("left\nside") == "left side"


# Answers as they reach the tokenizer in ScanQA (after clean_answer: lower case, only , ' - : kept).
CLEANED_ANSWERS = ["brown wooden chair", "twelve o'clock", "the 'left' side", "left, right", "black-and-white",
                   "left -- right", "left: table", "left\nside", "' chair '", "TV stand", "two"]


@pytest.mark.skipif(not caption.java_available(), reason="the PTB tokenizer needs Java")
def test_simple_tokenizer_matches_ptb_on_cleaned_answers():
    ptb = caption._tokenize({str(i): [a] for i, a in enumerate(CLEANED_ANSWERS)}, use_java=True)
    assert [ptb[str(i)][0] for i in range(len(CLEANED_ANSWERS))] == [caption.simple_tokenize(a)
                                                                     for a in CLEANED_ANSWERS]


def test_missing_pycocoevalcap_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    assert not caption.pycocoevalcap_available()
    with pytest.raises(ImportError,
                       match=r"need 'pycocoevalcap' \(`pip install \"geoalign\[eval\]\"`\); EM scores do not") as e:
        caption.caption_scores({"q": ["chair"]}, {"q": "chair"}, use_java=False)
    assert str(e.value).startswith("ScanQA caption metrics")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scanqa_em_without_pycocoevalcap():
    # pycocoevalcap blocked in a fresh interpreter: EM is still scored, the caption metrics are None, and the
    # scores (and the table's NOTE line) name the install command
    got = run_python("""
        import json, sys
        sys.modules["pycocoevalcap"] = None                      # every import of it fails
        from geoalign.eval import scanqa
        recs = [{"id": "1", "prediction": "Brown.", "answers": ["brown wooden", "brown"]},
                {"id": "2", "prediction": "table", "answers": ["desk"]}]
        s = scanqa.score(recs)
        print(json.dumps({"scores": s, "table": scanqa.format_table(s)}))
    """)
    s, table = got["scores"], got["table"].split("\n")
    # 1: exact-first (1, 1), LEO "brown wooden" first -> (0, 1); 2: (0, 0) both -> 50, 50, 0, 50
    assert (s["EM@1"], s["EM@1-refined"], s["EM@1-LEO"], s["EM@1-refined-LEO"]) == (50.0, 50.0, 0.0, 50.0)
    assert s["num_samples"] == 2
    assert {m: s[m] for m in scanqa.CAPTION_METRICS} == dict.fromkeys(scanqa.CAPTION_METRICS)
    assert 'pip install "geoalign[eval]"' in s["caption_metrics_missing_reason"]
    assert table[0] == "ScanQA (n=2)"
    assert table[3].split(" | ") == ["   n/a", "   n/a", "   n/a", "    n/a", "  n/a", "50.0"]
    assert table[-1] == "NOTE: " + s["caption_metrics_missing_reason"]


METRIC_MODULES = ("scanqa", "vsibench", "sqa3d", "textnorm", "boxes3d", "gap", "caption")


def test_metric_modules_import_without_torch():
    # the benchmark metrics are plain Python + numpy: none of these modules may need torch (or pycocoevalcap, or
    # transformers) at import time. Needs a lazy geoalign/__init__.py (importing geoalign must not import torch).
    got = run_python(f"""
        import importlib, json, sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "pycocoevalcap"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Blocked())
        for name in {METRIC_MODULES!r}:
            importlib.import_module("geoalign.eval." + name)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
    """)
    assert got == []


# ----------------------------------------------------------------------------- scoring a predictions file
@pytest.mark.parametrize("task", ["vsibench", "scanqa", "sqa3d", "gap"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_scoring_an_empty_predictions_file_is_one_error(task, content, tmp_path, capsys):
    from geoalign.eval import cli, runner

    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} holds no predictions$"):
        runner.score_file(task, str(path))
    assert cli.main(["score", task, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"{path} holds no predictions\n") and err.count("\n") == 1


def test_a_json_array_is_named_as_such(tmp_path):
    from geoalign.eval import runner

    record = {"id": "1", "task": "vsibench", "prediction": "A", "question_type": "route_planning",
              "ground_truth": "A"}
    for name, text in (("one_line.json", json.dumps([record])), ("pretty.json", json.dumps([record], indent=2)),
                       ("blank_first.json", "\n\n" + json.dumps([record, record], indent=1))):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            runner.read_predictions(str(path))
        assert str(e.value) == (f"{path} looks like a JSON array (it starts with '['); predictions must be JSONL: "
                                f"one JSON object per line")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps(record) + "\n")
    assert runner.read_predictions(str(jsonl)) == [record]


def test_score_file_records_the_vsibench_parsing(tmp_path):
    from geoalign.eval import cli, runner

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "1", "task": "vsibench", "prediction": " A", "question_type": "route_planning", "ground_truth": "A"},
        {"id": "2", "task": "vsibench", "prediction": "3.5m", "question_type": "object_counting",
         "ground_truth": "3.5"}]))
    # official: " A" -> "" (0), "3.5m" unparsable (0); stripped: "A" (100), 0; lmms-eval-0.7.3: 0, 3.5 (100)
    expected = {"official": (0.0, 0.0), "stripped": (100.0, 0.0), "lmms-eval-0.7.3": (0.0, 100.0)}
    for parsing, (route, count) in expected.items():
        s = runner.score_file("vsibench", str(path), vsibench_parsing=parsing)
        assert (s["route_planning"], s["object_counting"], s["parsing"]) == (route, count, parsing)
        out = tmp_path / f"{parsing}.json"
        assert cli.main(["score", "vsibench", str(path), "--vsibench-parsing", parsing, "--json", str(out)]) == 0
        assert json.loads(out.read_text())["parsing"] == parsing
    assert runner.score_file("vsibench", str(path))["parsing"] == "official"       # the default
    out = tmp_path / "default.json"
    assert cli.main(["score", "vsibench", str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["parsing"] == "official"


def test_caption_scores_rejects_mismatched_or_empty_input():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    with pytest.raises(ValueError, match="same ids"):
        caption.caption_scores({"a": ["chair"]}, {"b": "chair"}, use_java=False)
    with pytest.raises(ValueError, match="no samples"):
        caption.caption_scores({}, {}, use_java=False)


def test_caption_scores_say_why_meteor_is_missing():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    refs, preds = {"q": ["brown chair"]}, {"q": "brown chair"}
    off = caption.caption_scores(refs, preds, use_java=False, meteor=False)
    assert "METEOR" not in off and off["meteor_missing_reason"] == "METEOR disabled by the caller"
    no_java = caption.caption_scores(refs, preds, use_java=False)
    assert "METEOR" not in no_java
    assert no_java["meteor_missing_reason"] == ("METEOR not computed: it runs the Java program meteor-1.5.jar "
                                                "and no working `java` was found on PATH")
    assert "Java not found" in no_java["tokenizer"]


def test_caption_reference_split_over_lines_is_the_same_answer():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    s = caption.caption_scores({"q": ["brown wooden\nchair"]}, {"q": "brown wooden chair"}, use_java=False)
    assert s["BLEU-1"] == pytest.approx(100.0, rel=1e-6) and s["ROUGE-L"] == pytest.approx(100.0)


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


def test_scanqa_missing_prediction_is_an_empty_answer():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    recs = [{"id": "1", "prediction": "chair", "answers": ["chair"]},
            {"id": "2", "answers": ["sofa"]}]  # no prediction
    s = scanqa.score(recs, use_java=False)
    assert s["EM@1"] == 50.0 and s["EM@1-refined"] == 50.0 and s["num_samples"] == 2
    # corpus BLEU-1 over both questions: 1 hypothesis word, all matched (precision 1), against 2 reference
    # words: brevity penalty exp(1 - 2/1).  ROUGE-L: mean of 1 and 0.
    assert s["BLEU-1"] == pytest.approx(100 * math.exp(-1), rel=1e-6)
    assert s["ROUGE-L"] == pytest.approx(50.0)


def test_scanqa_single_question_and_nothing_to_score():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    s = scanqa.score([{"id": "7", "prediction": "Brown.", "answers": ["brown"]}], use_java=False, meteor=False)
    assert s["EM@1"] == 100.0 and s["num_samples"] == 1
    assert s["meteor_missing_reason"] == "METEOR disabled by the caller"  # the caller's choice is passed on
    with pytest.raises(ValueError, match="no ScanQA predictions"):
        scanqa.score([], use_java=False)


def test_scanqa_table_layout():
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    s = scanqa.score([{"id": "1", "prediction": "brown chair", "answers": ["brown chair"]},
                      {"id": "2", "prediction": "table", "answers": ["table"]}], use_java=False)
    title, row, rest = read_table(scanqa.format_table(s))
    assert f"n={s['num_samples']}" in title and f"tokenizer: {s['tokenizer']}" in title
    assert row == {c: f"{s[c]:.1f}" for c in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "EM@1")} | {"METEOR": "n/a"}
    assert list(row) == ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "EM@1"]
    assert row["EM@1"] == "100.0"
    assert len(rest) == 3 and rest[0].startswith("EM@1-refined") and rest[0].endswith(f": {s['EM@1-refined']:.1f}")
    assert rest[1] == "LEO's rule (first matching reference decides): EM@1-LEO 100.0, EM@1-refined-LEO 100.0"
    assert rest[2] == "NOTE: " + s["meteor_missing_reason"]


def test_close_meteor_stops_the_process_and_frees_the_lock():
    # compute_score() raised while holding the scorer's lock (e.g. the JVM died mid-answer): closing must stop
    # the process and leave a free lock, else pycocoevalcap's __del__ (which takes the lock) hangs at exit.
    meteor = pytest.importorskip("pycocoevalcap.meteor.meteor")
    scorer = meteor.Meteor.__new__(meteor.Meteor)  # a stand-in process instead of the JVM
    scorer.meteor_p = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    scorer.lock = threading.Lock()
    scorer.lock.acquire()
    try:
        caption._close_meteor(scorer)
        assert scorer.meteor_p.returncode is not None  # stopped and reaped (it ignores a closed stdin)
        assert scorer.lock.acquire(blocking=False)
        scorer.lock.release()
        scorer.__del__()  # pycocoevalcap's own cleanup now returns
    finally:
        if scorer.meteor_p.poll() is None:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()


def test_close_meteor_never_raises():
    # the process died with input still buffered: closing its stdin raises BrokenPipeError, which must not
    # replace the error that is propagating from compute_score()
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    proc.wait()
    proc.stdin.write(b"SCORE ||| brown chair ||| chair\n")
    held = threading.Lock()
    held.acquire()
    scorer = types.SimpleNamespace(meteor_p=proc, lock=held)
    caption._close_meteor(scorer)
    assert scorer.lock.acquire(blocking=False)
    caption._close_meteor(types.SimpleNamespace())  # a scorer without a METEOR process is left alone


@pytest.mark.skipif(not caption.java_available(), reason="the PTB tokenizer needs Java")
def test_java_tokenizes_predictions_and_references_alike():
    # PTB splits "don't" into "do n't", the Python stand-in does not: with Java (auto-detected) both sides go
    # through PTB, so an answer identical to its reference scores 100.
    s = caption.caption_scores({"q": ["don't know"]}, {"q": "don't know"}, meteor=False)
    assert s["tokenizer"].startswith("ptb")
    assert s["BLEU-1"] == pytest.approx(100.0, rel=1e-6) and s["ROUGE-L"] == pytest.approx(100.0)


@pytest.mark.skipif(not caption.java_available(), reason="METEOR and the PTB tokenizer need Java")
def test_caption_scores_with_java_meteor(monkeypatch):
    from pycocoevalcap.meteor import meteor

    scorers, raw = [], []

    class RecordingMeteor(meteor.Meteor):
        def __init__(self):
            super().__init__()
            scorers.append(self)

        def compute_score(self, gts, res):
            out = super().compute_score(gts, res)
            raw.append(out[0])
            return out

    monkeypatch.setattr(meteor, "Meteor", RecordingMeteor)
    refs = {"a": ["brown wooden chair"], "b": ["white table"], "c": ["left"]}
    preds = {"a": "brown wooden chair", "b": "table", "c": ""}
    s = caption.caption_scores(refs, preds, use_java=True)
    assert s["tokenizer"].startswith("ptb")
    assert "meteor_missing_reason" not in s
    assert 0.0 < s["METEOR"] < 100.0
    assert s["METEOR"] == pytest.approx(100.0 * raw[0], rel=1e-12)  # x100 like the other metrics
    assert scorers[0].meteor_p.poll() is not None  # the METEOR JVM is not left running
    # PTB tokenisation of these lower-case, punctuation-free answers equals the Python one.
    s2 = caption.caption_scores(refs, preds, use_java=False)
    for k in ("BLEU-1", "ROUGE-L", "CIDEr"):
        assert s[k] == pytest.approx(s2[k], rel=1e-9)


# --- the remaining messages a user reads, exactly (mutation survivors of eval-metrics) ---------------------------
def test_scoring_errors_read_exactly():
    with pytest.raises(ValueError, match="^refs and preds must have the same ids$"):
        caption.caption_scores({"a": ["x"]}, {"b": "x"}, use_java=False)
    with pytest.raises(ValueError, match="^no samples to score$"):
        caption.caption_scores({}, {}, use_java=False)
    with pytest.raises(ValueError, match="^no ScanQA predictions to score$"):
        scanqa.score([], use_java=False)
    with pytest.raises(ValueError, match="^no SQA3D predictions to score$"):
        sqa3d.score([])


def test_vsibench_table_counts_and_note_read_exactly():
    table = vsibench.format_table({"per_type": {"route_planning": 30.5, "obj_appearance_order": 40.0},
                                   "counts": {"obj_appearance_order": 7}, "missing_tasks": ["room_size_estimation"]})
    lines = table.splitlines()
    assert any(ln.split() == ["route_planning", "30.50", "(n=0)"] for ln in lines), table  # no count known: 0
    assert any(ln.split() == ["obj_appearance_order", "40.00", "(n=7)"] for ln in lines), table
    assert lines[-1] == ("NOTE: tasks absent from the predictions: room_size_estimation; 'Avg.' is over the present "
                         "tasks only.")


def test_vsibench_file_errors_read_exactly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"expected test\.jsonl or \*\.parquet \(the files of the "
                                                r"nyu-visionx/VSI-Bench dataset repo\)$"):
        vsibench.find_annotation_files(str(tmp_path))
    import builtins

    real_import = builtins.__import__

    def no_parquet(name, *args, **kwargs):
        if name.startswith(("pyarrow", "pandas")):
            raise ImportError(f"no {name} here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_parquet)
    with pytest.raises(ImportError, match=r"^reading x\.parquet needs 'pyarrow' \(or 'pandas' with a parquet "
                                          r"engine\); install one with `pip install pyarrow`, or provide test\.jsonl "
                                          r"instead$"):
        vsibench._read_parquet(["x.parquet"])
