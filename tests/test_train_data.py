"""Training data: records, errors naming the record, skip-and-count, tokens/labels (parity with the processor),
collation of samples with different frame counts."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from geoalign.processing import GeoAlignProcessor  # noqa: E402
from geoalign.training.data import (GeoAlignCollator, GeoAlignSFTDataset, MissingMediaError,  # noqa: E402
                                    RecordError, load_records, parse_record,
                                    tokenize_conversation)
from geoalign.training.synthetic import make_colour_dataset  # noqa: E402


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


def _img(rid, value, key="images"):
    """A record whose media are given as ``key`` ("images" or the singular "image") instead of "video"."""
    return {"id": rid, key: value, "conversations": _ok()["conversations"]}


_Q, _A = {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}


@pytest.mark.parametrize("bad, msg", [
    (_ok("bad-7", conversations=[]), "'conversations' must be a non-empty list of {'from', 'value'} turns"),
    (_ok("bad-7", conversations="Q? A."), "'conversations' must be a non-empty list of {'from', 'value'} turns"),
    (_ok("bad-7", conversations=[_A, _Q]), "needs at least one human turn followed by a gpt turn"),
    (_ok("bad-7", conversations=[_Q]), "needs at least one human turn followed by a gpt turn"),
    (_ok("bad-7", conversations=[_Q, _A, _A]),
     "turns must alternate human/gpt starting with human; turn 2 is assistant"),
    (_ok("bad-7", conversations=[_Q, {"from": "robot", "value": "A"}]),
     "turn 1: unknown speaker 'robot' (expected human/gpt/system)"),
    (_ok("bad-7", conversations=[{"from": "human"}, _A]),
     "turn 0 must be an object with string 'from' and 'value', got {'from': 'human'}"),
    (_ok("bad-7", conversations=["hello", _A]), "turn 0 must be an object with string 'from' and 'value', got 'hello'"),
    (_ok("bad-7", conversations=[_Q, {"from": 5, "value": "A"}]),
     "turn 1 must be an object with string 'from' and 'value', got {'from': 5, 'value': 'A'}"),
    (_ok("bad-7", conversations=[_Q, _A, {"from": "system", "value": "S"}, _A]),
     "turn 2: a system turn may only come first"),
    (_ok("bad-7", images=["media/i002/0000.png"]), "needs exactly one of 'video' or 'images'"),
    (_ok("bad-7", image="media/i002/0000.png"), "needs exactly one of 'video' or 'images'"),
    ({"id": "bad-7", "conversations": [_Q, _A]}, "needs exactly one of 'video' or 'images'"),
    (_ok("bad-7", video=""), "'video' must be a non-empty path string, got ''$"),
    (_ok("bad-7", video=3), "'video' must be a non-empty path string, got 3$"),
    (_img("bad-7", ""), "'images' must be a non-empty path string, got ''$"),
    (_img("bad-7", "", key="image"), "'images' must be a non-empty path string, got ''$"),
    (_img("bad-7", ["media/i002/0000.png", ""]), "'images' must be a non-empty path string, got ''$"),
    (_img("bad-7", []), "'images' must be a path or a non-empty list of paths, got []"),
    (_img("bad-7", 7), "'images' must be a path or a non-empty list of paths, got 7"),
    (_img("bad-7", {"a": "media/f001"}),
     "'images' must be a path or a non-empty list of paths, got {'a': 'media/f001'}"),
])
def test_malformed_records_name_the_id(synth, tmp_path, caplog, bad, msg):
    """The whole message: the record id, what is wrong (with the offending value) and where the record is."""
    _, root = synth
    path = _write(tmp_path, [_ok("good"), bad])
    # ("$": a bad path value's message, from _resolve, does not say where the record is)
    want = f"record 'bad-7': {msg[:-1]}" if msg.endswith("$") else f"record 'bad-7': {msg} (at {path}:2)"
    with pytest.raises(RecordError) as ei:
        load_records([path], root)
    assert str(ei.value) == want and ei.value.record_id == "bad-7"
    caplog.set_level(logging.WARNING, logger="geoalign.training")
    recs, skipped = load_records([path], root, skip_bad=True)
    assert [r.id for r in recs] == ["good"] and skipped == {"bad-7": want}
    logged = [r.getMessage() for r in caplog.records if r.name == "geoalign.training"]
    assert logged == [f"skipped 1 bad training records (first: {want})"]


def test_records_that_are_not_objects_and_empty_files(synth, tmp_path):
    _, root = synth
    # a .jsonl whose first line is a JSON list: still JSONL (one bad record named by its line), not a JSON list file
    path = _write(tmp_path, ['["not", "a", "record"]', _ok("good"), "7"])
    with pytest.raises(RecordError) as ei:
        load_records([path], root)
    assert str(ei.value) == f"record '{path}:1': a record must be a JSON object, got list (at {path}:1)"
    assert ei.value.record_id == f"{path}:1"
    recs, skipped = load_records([path], root, skip_bad=True)
    assert [r.id for r in recs] == ["good"]
    assert skipped == {f"{path}:1": f"record '{path}:1': a record must be a JSON object, got list (at {path}:1)",
                       f"{path}:3": f"record '{path}:3': a record must be a JSON object, got int (at {path}:3)"}
    # nothing usable: the error names the files, and the number skipped when there were any
    bad = _write(tmp_path, ["[1]", "{oops"], "bad.jsonl")
    with pytest.raises(ValueError) as ei:
        load_records([bad], root, skip_bad=True)
    assert str(ei.value) == f"no usable training records in [{bad!r}] (2 skipped)"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError) as ei:
        load_records([empty], root, skip_bad=True)
    assert str(ei.value) == f"no usable training records in [{str(empty)!r}]"


def test_read_records_formats(synth, tmp_path, monkeypatch):
    """.json lists (also pretty-printed, after leading blank lines), JSONL under any name, blank lines, UTF-8."""
    from geoalign.training import data as data_mod

    _, root = synth
    recs = [_ok(f"r{i}") for i in range(3)]
    pretty = tmp_path / "pretty.json"
    pretty.write_text("\n\n  " + json.dumps(recs, indent=2) + "\n")
    got, _ = load_records([pretty], root)
    assert [r.id for r in got] == ["r0", "r1", "r2"]
    assert [r.source for r in got] == [f"{pretty}[{i}]" for i in range(3)]
    # JSONL content in a .json / .txt file, with blank lines between records (they are skipped, not the end)
    for name in ("lines.json", "lines.txt"):
        p = tmp_path / name
        p.write_text(json.dumps(recs[0]) + "\n\n   \n" + json.dumps(recs[1]) + "\n\n" + json.dumps(recs[2]) + "\n")
        got, _ = load_records([p], root)
        assert [r.id for r in got] == ["r0", "r1", "r2"]
        assert [r.source for r in got] == [f"{p}:1", f"{p}:4", f"{p}:6"]
    # a .json file that starts like a list but is not valid JSON
    broken = tmp_path / "broken.json"
    broken.write_text("[" + json.dumps(recs[0]) + ",")
    with pytest.raises(ValueError, match=r"training data file .*broken\.json' is not valid JSON: Expecting value"):
        load_records([broken], root)
    # the file is read as UTF-8 whatever the locale's default encoding (simulated: latin-1 when none is given)
    real_open = open

    def latin1_default_open(file, mode="r", *a, encoding=None, **kw):
        return real_open(file, mode, *a, encoding=encoding or "latin-1", **kw)

    monkeypatch.setattr(data_mod, "open", latin1_default_open, raising=False)
    u = tmp_path / "u.jsonl"
    u.write_text(json.dumps(_ok("ü-1", conversations=[{"from": "human", "value": "Wie viele Stühle? – ≥2"},
                                                       {"from": "gpt", "value": "Vier 🪑"}]), ensure_ascii=False),
                 encoding="utf-8")
    got, _ = load_records([u], root)
    assert got[0].id == "ü-1" and got[0].turns == [("user", "Wie viele Stühle? – ≥2"), ("assistant", "Vier 🪑")]


def test_parsed_record_fields(synth, tmp_path):
    """Media kind and resolved paths for every way of naming media; roles; the source; media_root=None."""
    _, root = synth
    absdir = os.path.join(root, "media", "f004")
    recs = [_ok("v", conversations=[{"from": "System", "value": "S."}, {"from": "Human", "value": "<image> Q1"},
                                    {"from": "GPT", "value": "A1"}, {"from": "user", "value": "Q2"},
                                    {"from": "assistant", "value": "A2"}, {"from": "human", "value": "Q3?"}]),
            _img("one", "media/i002/0001.png", key="image"),
            _img("folder", "media/f001"),
            _img("list", ["media/i002/0002.png", "media/i002/0000.png"]),
            _ok("abs", video=absdir)]
    path = _write(tmp_path, recs)
    got, skipped = load_records([path], root)
    assert skipped == {}
    j = lambda rel: os.path.join(root, rel)  # noqa: E731
    assert [(r.id, r.media_kind, r.media, r.source) for r in got] == [
        ("v", "video", j("media/f001"), f"{path}:1"),
        ("one", "images", j("media/i002/0001.png"), f"{path}:2"),
        ("folder", "images", j("media/f001"), f"{path}:3"),
        ("list", "images", [j("media/i002/0002.png"), j("media/i002/0000.png")], f"{path}:4"),
        ("abs", "video", absdir, f"{path}:5")]
    assert got[0].turns == [("system", "S."), ("user", "<image> Q1"), ("assistant", "A1"), ("user", "Q2"),
                            ("assistant", "A2")]                         # the trailing question is dropped
    # without a media root: absolute paths as they are, relative ones unchanged (checked against the cwd)
    got, _ = load_records([_write(tmp_path, [recs[4]], "abs.jsonl")])
    assert got[0].media == absdir
    rel = _write(tmp_path, [_ok("rel", video="media/f001"), _img("rl", ["a/1.png", "a/2.png"])], "rel.jsonl")
    with pytest.raises(MissingMediaError, match=r"record 'rel': media not found: \['media/f001'\]"):
        load_records([rel])
    got, _ = load_records([rel], check_media=False)
    assert [r.media for r in got] == ["media/f001", ["a/1.png", "a/2.png"]]
    # parse_record checks the media by default
    with pytest.raises(MissingMediaError, match="record 'x': media not found"):
        parse_record(_ok("x", video="media/nope"), "src:1", root)
    assert parse_record(_ok("x", video="media/nope"), "src:1", root, check_media=False).media == j("media/nope")


@pytest.mark.parametrize("n_missing", [3, 4])
def test_missing_media_message_lists_three(synth, tmp_path, n_missing):
    _, root = synth
    names = [f"media/gone{i}.png" for i in range(n_missing)]
    path = _write(tmp_path, [_img("m", ["media/i002/0000.png"] + names)])
    with pytest.raises(MissingMediaError) as ei:
        load_records([path], root)
    shown = [os.path.join(root, n) for n in names[:3]]
    assert str(ei.value) == (f"record 'm': media not found: {shown}{' ...' if n_missing > 3 else ''} "
                             f"(at {path}:1)")


def test_bad_json_line_and_missing_id(synth, tmp_path):
    _, root = synth
    path = _write(tmp_path, [_ok("good"), "{not json", json.dumps({"video": "media/f001"})])
    with pytest.raises(RecordError) as ei:
        load_records([path], root)
    assert str(ei.value) == (f"record '{path}:2': invalid JSON at {path}:2: "
                             "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")
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


def test_conversation_text_and_labels_exact(synth, tok):
    """The whole rendered conversation, token for token: frames first in the first user turn (the <video> marker
    removed), the later user turn's text, and labels on exactly the answers and their <|im_end|>."""
    path, root = synth
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    it = GeoAlignSFTDataset.from_files(path, proc, root)[2]        # 3 images, two question/answer turns
    counts = (it["grid_thw"].prod(-1) // 4).tolist()
    assert len(counts) == 3 and all(c > 0 for c in counts)
    vis = "".join("<|vision_start|>" + "<|image_pad|>" * c + "<|vision_end|>" for c in counts)
    prompt1 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + vis
               + "What colour is the scene?<|im_end|>\n<|im_start|>assistant\n")
    ans1 = "It is blue.<|im_end|>"
    prompt2 = "\n<|im_start|>user\nHow many frames?<|im_end|>\n<|im_start|>assistant\n"
    ans2 = "3 frames.<|im_end|>"
    pieces = [(prompt1, False), (ans1, True), (prompt2, False), (ans2, True)]
    ids = [t for text, _ in pieces for t in tok(text, add_special_tokens=False)["input_ids"]]
    labels = [t if sup else -100 for text, sup in pieces for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert it["input_ids"].dtype == torch.long and it["labels"].dtype == torch.long
    assert it["input_ids"].tolist() == ids and it["labels"].tolist() == labels


def test_tokenize_conversation_template_and_errors(tok):
    from tokenizers.processors import TemplateProcessing

    from geoalign.processing import QWEN2_5_VL_CHAT_TEMPLATE
    from geoalign.tiny import make_tokenizer

    turns = [("user", "<image>Q1?"), ("assistant", "A1"), ("user", "Q2?"), ("assistant", "A2")]
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ids, labels = tokenize_conversation(proc, turns, [2, 3], "r1")
    # the processor's chat template is used, not the tokenizer's
    own = QWEN2_5_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You name colours.")
    assert own != QWEN2_5_VL_CHAT_TEMPLATE
    ids2, labels2 = tokenize_conversation(GeoAlignProcessor(tok, None, num_frames=4, chat_template=own), turns,
                                          [2, 3], "r1")
    head = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids2.tolist() == head("<|im_start|>system\nYou name colours.") + ids.tolist()[len(
        head("<|im_start|>system\nYou are a helpful assistant.")):]
    assert (labels2 != -100).sum() == (labels != -100).sum() == len(head("A1<|im_end|>A2<|im_end|>"))
    # pieces are tokenized without special tokens, even with a tokenizer that adds a BOS by default
    bos_tok = make_tokenizer()
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", bos_tok.pad_token_id)])
    assert bos_tok("ab")["input_ids"] == [bos_tok.pad_token_id] + head("ab")
    ids3, labels3 = tokenize_conversation(GeoAlignProcessor(bos_tok, None, num_frames=4), turns, [2, 3], "r1")
    assert torch.equal(ids3, ids) and torch.equal(labels3, labels)
    # a visual placeholder typed into a later turn; the default record id is "?"
    leak = turns[:2] + [("user", "what is <|image_pad|>?"), ("assistant", "A2")]
    with pytest.raises(RecordError) as ei:
        tokenize_conversation(proc, leak, [2])
    assert str(ei.value) == "record '?': visual placeholder <|image_pad|> outside the first user turn"
    with pytest.raises(RecordError) as ei:
        tokenize_conversation(GeoAlignProcessor(tok, None, group_size=8), leak[:2] + [
            ("user", "<|video_pad|>"), ("assistant", "A")], [2], "r3")
    assert str(ei.value) == "record 'r3': visual placeholder <|video_pad|> outside the first user turn"
    # a template whose rendering of a longer conversation does not extend the shorter one's
    counting = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}"
                "{{ m.content }}{% else %}{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% else %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    # a template that dispatches on each content part's "type": text parts of every user turn are typed "text"
    typed = GeoAlignProcessor(tok, None, num_frames=4, chat_template=counting.split("}}", 1)[1])
    ids5, labels5 = tokenize_conversation(typed, turns, [2], "r2")
    assert tok.decode(ids5) == ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Q1?"
                                "<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2?<|im_end|>\n"
                                "<|im_start|>assistant\nA2<|im_end|>")
    assert tok.decode(ids5[labels5 != -100]) == "A1<|im_end|>A2<|im_end|>"
    odd = GeoAlignProcessor(tok, None, num_frames=4, chat_template=counting)
    ids4, labels4 = tokenize_conversation(odd, turns[:2], [2], "r2")       # one answer: fine
    assert tok.decode(ids4) == "1<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Q1?" \
                               "<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>"
    assert tok.decode(ids4[labels4 != -100]) == "A1<|im_end|>"
    with pytest.raises(RecordError) as ei:
        tokenize_conversation(odd, turns, [2], "r2")
    assert str(ei.value) == ("record 'r2': the chat template does not render conversations incrementally; "
                             "cannot locate the assistant turns")


def test_dataset_num_frames_and_media_sources(synth, tmp_path, tok, monkeypatch):
    """num_frames: the dataset's own or the processor's; an image list loads only the sampled files; an image folder
    named by "images" is loaded as a folder (as when named by "video")."""
    import geoalign.geometry.frames as frames_mod

    path, root = synth
    proc = GeoAlignProcessor(tok, None, num_frames=2)
    recs, _ = load_records([path], root)
    assert GeoAlignSFTDataset(recs, proc).num_frames == 2
    assert GeoAlignSFTDataset(recs, proc, num_frames=3).num_frames == 3
    ds1 = GeoAlignSFTDataset.from_files(path, proc, root, num_frames=1)
    assert ds1.num_frames == 1
    assert [ds1[i]["vggt_pixel_values"].shape[0] for i in (1, 2)] == [1, 1]   # a 2-frame folder, a 3-image list
    loaded = []
    real = frames_mod.load_image
    monkeypatch.setattr(frames_mod, "load_image", lambda p, *a, **k: loaded.append(p) or real(p, *a, **k))
    it = GeoAlignSFTDataset(recs, proc)[2]
    assert loaded == [os.path.join(root, f"media/i002/{k:04d}.png") for k in (0, 2)]      # round(linspace(0, 2, 2))
    assert it["vggt_pixel_values"].shape[0] == 2 and it["grid_thw"].shape[0] == 2
    monkeypatch.setattr(frames_mod, "load_image", real)
    conv = [{"from": "human", "value": "<video>\nWhat colour is the scene?"}, {"from": "gpt", "value": "It is green."}]
    folder = load_records([_write(tmp_path, [{"id": "fold", "images": "media/f001", "conversations": conv}])], root)[0]
    a, b = GeoAlignSFTDataset(folder, proc)[0], GeoAlignSFTDataset([recs[1]], proc)[0]   # "images" / "video": f001
    assert a["id"] == "fold" and b["id"] == "sample001"
    for k in ("input_ids", "labels", "pixel_values", "grid_thw", "vggt_pixel_values", "gather_index"):
        assert torch.equal(a[k], b[k]), k


def test_max_length_boundary_and_error_names_record(synth, tmp_path, tok):
    path, root = synth
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    recs, _ = load_records([path], root)
    n = GeoAlignSFTDataset(recs, proc)[0]["input_ids"].numel()
    assert GeoAlignSFTDataset(recs, proc, max_length=n)[0]["input_ids"].numel() == n       # exactly at the limit
    with pytest.raises(RecordError) as ei:
        GeoAlignSFTDataset(recs, proc, max_length=n - 1)[0]
    assert str(ei.value) == (f"record 'sample000': {n} tokens exceed max_length={n - 1} "
                             "(fewer frames, or a larger max_length)")
    leak = load_records([_write(tmp_path, [_ok("leak", conversations=[
        _Q, _A, {"from": "human", "value": "and <|image_pad|>?"}, _A])], "leak.jsonl")], root)[0]
    with pytest.raises(RecordError) as ei:
        GeoAlignSFTDataset(leak, proc)[0]
    assert str(ei.value) == "record 'leak': visual placeholder <|image_pad|> outside the first user turn"
    recs[0].media = os.path.join(root, "media/removed.mp4")
    with pytest.raises(MissingMediaError) as ei:
        GeoAlignSFTDataset(recs[:1], proc)[0]
    assert str(ei.value).startswith("record 'sample000': media not found: ") and "removed.mp4" in str(ei.value)


def test_skip_bad_takes_the_next_record_and_warns_once(synth, tmp_path, tok, caplog):
    _, root = synth
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video at all" * 10)
    path = _write(tmp_path, [_ok("first"), _ok("broken", video=str(broken)), _ok("next", video="media/v003.mp4")])
    proc = GeoAlignProcessor(tok, None, num_frames=4)
    ds = GeoAlignSFTDataset.from_files(path, proc, root, skip_bad=True)
    caplog.set_level(logging.WARNING, logger="geoalign.training")
    logged = lambda: [r.getMessage() for r in caplog.records if r.name == "geoalign.training"]  # noqa: E731
    assert ds[1]["id"] == "next" and list(ds.skipped) == ["broken"]
    reason = ds.skipped["broken"]
    assert reason.startswith(f"record 'broken': cannot load media {str(broken)!r}: ")
    assert logged() == [f"skipping bad record: {reason}"]                     # at the first failure
    assert ds[1]["id"] == "next" and ds[2]["id"] == "next" and ds[0]["id"] == "first"
    assert logged() == [f"skipping bad record: {reason}"]                     # once, not at every access
    # every record bad: a clear error counting them
    path2 = _write(tmp_path, [_ok("b1", video=str(broken)), _ok("b2", video=str(broken))], "allbad.jsonl")
    ds = GeoAlignSFTDataset.from_files(path2, proc, root, skip_bad=True)
    with pytest.raises(RuntimeError) as ei:
        ds[1]
    assert str(ei.value) == "every record failed to load (2 bad records)" and list(ds.skipped) == ["b2", "b1"]


def _fake_sample(g, sid, T, frames, pad_id):
    ids = torch.randint(300, 400, (T,), generator=g)
    ids[1:1 + 3 * frames] = pad_id
    labels = torch.full((T,), -100)
    labels[-2:] = ids[-2:]
    return {"id": sid, "input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(4 * 3 * frames, 5, generator=g), "grid_thw": torch.tensor([[1, 2, 6]] * frames),
            "vggt_pixel_values": torch.randn(frames, 3, 4, 4, generator=g),
            "gather_index": torch.randint(0, 9, (3 * frames, 4), generator=g)}


@pytest.mark.parametrize("G", [4, 8])
def test_collator_padding_dtypes_and_mm_token_types(G):
    g = torch.Generator().manual_seed(G)
    pad_id, vis = 256, 261 if G == 4 else 262
    samples = [_fake_sample(g, "a", 13, 2, vis), _fake_sample(g, "b", 9, 1, vis), _fake_sample(g, "c", 13, 3, vis)]
    for mm in (True, False):
        batch = GeoAlignCollator(pad_id, G, vis, mm_token_type_ids=mm)(samples)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.long and ids.shape == (3, 13)
        assert ids[1].tolist() == [pad_id] * 4 + samples[1]["input_ids"].tolist()            # left padding
        assert labels[1].tolist() == [-100] * 4 + samples[1]["labels"].tolist()
        assert mask.tolist() == [[1] * 13, [0] * 4 + [1] * 9, [1] * 13]
        assert torch.equal(ids[0], samples[0]["input_ids"]) and torch.equal(labels[2], samples[2]["labels"])
        kind = "pixel_values" if G == 4 else "pixel_values_videos"
        grid = "image_grid_thw" if G == 4 else "video_grid_thw"
        assert torch.equal(batch[kind], torch.cat([s["pixel_values"] for s in samples]))
        assert batch[grid].tolist() == [[1, 2, 6]] * 6 and batch["ids"] == ["a", "b", "c"]
        if mm:
            want = torch.zeros(3, 13, dtype=torch.long)
            for b, (s, n) in enumerate(zip(samples, (2, 1, 3))):
                want[b, 13 - s["input_ids"].numel() + 1: 13 - s["input_ids"].numel() + 1 + 3 * n] = G // 4
            assert batch["mm_token_type_ids"].dtype == torch.long and torch.equal(batch["mm_token_type_ids"], want)
        else:
            assert "mm_token_type_ids" not in batch
    assert "mm_token_type_ids" not in GeoAlignCollator(pad_id, G, None, mm_token_type_ids=True)(samples)
    with pytest.raises(ValueError) as ei:
        GeoAlignCollator(pad_id, G, vis)([])
    assert str(ei.value) == "cannot collate an empty batch"


def test_collator_for_processor_pad_falls_back_to_eos(tok):
    from types import SimpleNamespace

    class NoPadTok:
        pad_token_id, eos_token_id = None, 151645

        def convert_tokens_to_ids(self, t):
            return {"<|image_pad|>": 151655, "<|video_pad|>": 151656}[t]

    c = GeoAlignCollator.for_processor(SimpleNamespace(tokenizer=NoPadTok(), group_size=8))
    assert (c.pad_token_id, c.group_size, c.image_pad_id) == (151645, 8, 151656)
    c = GeoAlignCollator.for_processor(GeoAlignProcessor(tok, None))
    assert (c.pad_token_id, c.group_size, c.image_pad_id) == (tok.pad_token_id, 4, 261)
