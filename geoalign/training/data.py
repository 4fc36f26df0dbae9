"""Training data: LLaVA-style records -> GeoAlign model inputs, and a collator for samples with different frame counts.

A record (one JSON object in a ``.json`` list or one line of a ``.jsonl`` file)::

    {"id": "scene0000_00_q3",
     "video": "scannet/scene0000_00.mp4",              # a video file or a folder of frames,
     # or "images": ["a/0001.jpg", "a/0002.jpg"] (the frames) or "images": "a/"
     "conversations": [{"from": "human", "value": "<video>\\nHow many chairs?"},
                       {"from": "gpt", "value": "4"},
                       {"from": "human", "value": "And tables?"}, {"from": "gpt", "value": "1"}]}

Relative media paths are resolved against ``media_root`` and must stay inside it (a ``..`` that climbs out is an error
naming the record); absolute paths, or any path without ``media_root``, are used as written. Frames are sampled and
prepared exactly as :class:`geoalign.GeoAlignProcessor` does (``processor.prepare``); the frames go first in the
first user turn (``<image>`` / ``<video>`` markers in the text are removed). Only assistant tokens (each answer and
its ``<|im_end|>``) are supervised; for one question and one answer the tokens and labels equal the processor's.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..local_paths import resolve_inside

logger = logging.getLogger("geoalign.training")

IGNORE_INDEX = -100
USER_ROLES = {"human": "user", "user": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant"}
SYSTEM_ROLES = {"system": "system"}
MEDIA_MARKERS = re.compile(r"\s*<(image|video)>\s*")
IM_END = "<|im_end|>"


class RecordError(ValueError):
    """A malformed training record or one whose media cannot be loaded; the message names the record id."""

    def __init__(self, record_id: str, message: str):
        super().__init__(f"record {record_id!r}: {message}")
        self.record_id = record_id


class MissingMediaError(RecordError, FileNotFoundError):
    """A record's video / image file or folder does not exist."""


# ----------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    id: str
    media_kind: str                    # "video" (file or folder) or "images" (list of files or a folder)
    media: str | list[str]             # resolved absolute path(s)
    turns: list[tuple[str, str]]       # (role, text): roles "system", "user", "assistant"
    source: str = ""                   # "file:line" for messages


def read_records(path: str | os.PathLike) -> list[tuple[dict, str]]:
    """Raw records of a ``.json`` (a list of objects) or ``.jsonl`` file, each with its "file:line/index"."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"training data file not found: {p!r}")
    out: list[tuple[dict, str]] = []
    with open(p, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if p.endswith(".jsonl") or (stripped and not stripped.startswith("[")):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), f"{p}:{n}"))
            except json.JSONDecodeError as e:
                out.append(({"__bad_json__": str(e)}, f"{p}:{n}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"training data file {p!r} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"training data file {p!r} must hold a JSON list of records (or be JSONL)")
    return [(r, f"{p}[{i}]") for i, r in enumerate(data)]


def _resolve(root: str | None, rel: Any, rid: str, key: str) -> str:
    """A record's media path: absolute, or without media_root, as written; else media_root/path, which must stay
    inside media_root (a ``..`` that climbs out is an error naming the record)."""
    if not isinstance(rel, str) or not rel:
        raise RecordError(rid, f"{key!r} must be a non-empty path string, got {rel!r}")
    if root is None:
        return rel
    try:
        return resolve_inside(root, rel, key)
    except ValueError as e:
        raise RecordError(rid, str(e)) from None


def parse_record(raw: Any, source: str, media_root: str | None = None, check_media: bool = True) -> Record:
    """Validate one raw record; raises :class:`RecordError` (or :class:`MissingMediaError`) naming its id."""
    if not isinstance(raw, dict):
        raise RecordError(source, f"a record must be a JSON object, got {type(raw).__name__} (at {source})")
    if "__bad_json__" in raw:
        raise RecordError(source, f"invalid JSON at {source}: {raw['__bad_json__']}")
    rid = raw.get("id")
    rid = str(rid) if rid is not None else source
    where = f" (at {source})"
    has_video, has_images = "video" in raw, "images" in raw or "image" in raw
    if has_video == has_images:
        raise RecordError(rid, "needs exactly one of 'video' or 'images'" + where)
    if has_video:
        kind, media = "video", _resolve(media_root, raw["video"], rid, "video")
        paths = [media]
    else:
        val = raw.get("images", raw.get("image"))
        kind = "images"
        if isinstance(val, str):
            media = _resolve(media_root, val, rid, "images")
            paths = [media]
        elif isinstance(val, list) and val:
            media = [_resolve(media_root, v, rid, "images") for v in val]
            paths = media
        else:
            raise RecordError(rid, f"'images' must be a path or a non-empty list of paths, got {val!r}" + where)
    if check_media:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise MissingMediaError(rid, f"media not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                                         + where)
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RecordError(rid, "'conversations' must be a non-empty list of {'from', 'value'} turns" + where)
    turns: list[tuple[str, str]] = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise RecordError(rid, f"turn {j} must be an object with string 'from' and 'value', got {t!r}" + where)
        who = t["from"].lower()
        role = USER_ROLES.get(who) or ASSISTANT_ROLES.get(who) or SYSTEM_ROLES.get(who)
        if role is None:
            raise RecordError(rid, f"turn {j}: unknown speaker {t['from']!r} (expected human/gpt/system)" + where)
        if role == "system" and j != 0:
            raise RecordError(rid, f"turn {j}: a system turn may only come first" + where)
        turns.append((role, t["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    if len(body) >= 1 and body[-1][0] == "user":
        body = body[:-1]                       # a trailing question has no answer to learn from
    if len(body) < 2:
        raise RecordError(rid, "needs at least one human turn followed by a gpt turn" + where)
    for j, (role, _) in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            raise RecordError(rid, f"turns must alternate human/gpt starting with human; turn {j} is {role}" + where)
    turns = (turns[:1] if turns[0][0] == "system" else []) + body
    return Record(rid, kind, media, turns, source)


def load_records(paths: Sequence[str | os.PathLike], media_root: str | None = None, *, skip_bad: bool = False,
                 check_media: bool = True) -> tuple[list[Record], dict[str, str]]:
    """Parse every record of every file. Returns (records, skipped) where skipped maps record id -> reason (only
    with ``skip_bad``; otherwise the first bad record raises)."""
    records: list[Record] = []
    skipped: dict[str, str] = {}
    for path in paths:
        for raw, src in read_records(path):
            try:
                records.append(parse_record(raw, src, media_root, check_media))
            except RecordError as e:
                if not skip_bad:
                    raise
                skipped[e.record_id] = str(e)
    if skipped:
        logger.warning("skipped %d bad training records (first: %s)", len(skipped), next(iter(skipped.values())))
    if not records:
        raise ValueError(f"no usable training records in {[os.fspath(p) for p in paths]}"
                         + (f" ({len(skipped)} skipped)" if skipped else ""))
    return records, skipped


# ----------------------------------------------------------------------------------------------- tokenisation
def _messages(turns: list[tuple[str, str]], num_items: int, kind: str) -> list[dict]:
    msgs, first_user = [], True
    for role, text in turns:
        if role == "user":
            text = MEDIA_MARKERS.sub(" ", text).strip()
            if first_user:
                content = [{"type": kind}] * num_items + [{"type": "text", "text": text}]
                first_user = False
            else:
                content = [{"type": "text", "text": text}]
            msgs.append({"role": "user", "content": content})
        else:
            msgs.append({"role": role, "content": text})
    return msgs


def tokenize_conversation(processor, turns: list[tuple[str, str]], visual_counts: list[int],
                          record_id: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], labels [T]) for a conversation whose first user turn carries ``len(visual_counts)`` images
    (G=4) or one video (G=8) with that many visual tokens each. Labels cover each answer and its ``<|im_end|>``."""
    from ..processing import IMAGE_PAD, VIDEO_PAD, _expand_placeholders

    G = processor.group_size
    kind, pad = ("image", IMAGE_PAD) if G == 4 else ("video", VIDEO_PAD)
    msgs = _messages(turns, len(visual_counts), kind)
    tok = processor.tokenizer

    def render(m, gen):
        return tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen,
                                       chat_template=processor.chat_template)

    pieces: list[tuple[str, bool]] = []
    prev = ""
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(msgs[:j], True)
        if not prompt.startswith(prev):
            raise RecordError(record_id, "the chat template does not render conversations incrementally; "
                                         "cannot locate the assistant turns")
        pieces.append((prompt[len(prev):], False))
        answer = m["content"] + IM_END
        pieces.append((answer, True))
        prev = prompt + answer
    ids, labels = [], []
    first = True
    for text, supervised in pieces:
        if first:
            text = _expand_placeholders(text, pad, visual_counts)
            first = False
        elif pad in text:
            raise RecordError(record_id, f"visual placeholder {pad} outside the first user turn")
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if supervised else [IGNORE_INDEX] * len(t))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- dataset
class GeoAlignSFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of :class:`Record` s; ``dataset[i]`` is one sample's tensors (see :class:`GeoAlignCollator`).

    With ``skip_bad`` a record whose media fail to load (or whose tokens exceed ``max_length``) is replaced by the
    next good record (deterministically) and counted in ``self.skipped``; otherwise a :class:`RecordError` naming
    the record is raised.
    """

    def __init__(self, records: list[Record], processor, *, num_frames: int | None = None, max_length: int = 0,
                 skip_bad: bool = False, skipped: dict[str, str] | None = None):
        self.records = records
        self.processor = processor
        self.num_frames = num_frames if num_frames is not None else processor.num_frames
        self.max_length = max_length
        self.skip_bad = skip_bad
        self.skipped: dict[str, str] = dict(skipped or {})

    @classmethod
    def from_files(cls, paths, processor, media_root: str | None = None, *, num_frames: int | None = None,
                   max_length: int = 0, skip_bad: bool = False) -> "GeoAlignSFTDataset":
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        records, skipped = load_records(paths, media_root, skip_bad=skip_bad)
        return cls(records, processor, num_frames=num_frames, max_length=max_length, skip_bad=skip_bad,
                   skipped=skipped)

    def __len__(self) -> int:
        return len(self.records)

    def _source(self, rec: Record):
        from ..geometry.frames import load_image
        from ..geometry.sampling import sample_frame_indices

        if rec.media_kind == "images" and isinstance(rec.media, list):
            idx = sample_frame_indices(len(rec.media), self.num_frames)
            return [load_image(rec.media[i]) for i in idx]
        return rec.media                            # a video file or an image folder: prepare_frames loads it

    def encode(self, rec: Record) -> dict[str, Any]:
        """One record -> tensors. Raises RecordError / MissingMediaError naming the record."""
        from ..geometry.alignment import MERGE_SIZE as MERGE

        try:
            af = self.processor.prepare(self._source(rec), self.num_frames)
        except FileNotFoundError as e:
            raise MissingMediaError(rec.id, f"media not found: {e}") from e
        except (ValueError, OSError) as e:
            raise RecordError(rec.id, f"cannot load media {rec.media!r}: {e}") from e
        from ..geometry.alignment import check_grid_thw

        pv, grid = self.processor._pixels(af.qwen_images)
        check_grid_thw(grid, af.num_frames, af.qwen_grid, self.processor.group_size)
        counts = [int(g.prod()) // (MERGE * MERGE) for g in grid]
        input_ids, labels = tokenize_conversation(self.processor, rec.turns, counts, rec.id)
        if self.max_length and input_ids.numel() > self.max_length:
            raise RecordError(rec.id, f"{input_ids.numel()} tokens exceed max_length={self.max_length} "
                                      "(fewer frames, or a larger max_length)")
        from ..processing import second_per_grid

        return {"id": rec.id, "input_ids": input_ids, "labels": labels, "pixel_values": pv, "grid_thw": grid,
                "vggt_pixel_values": af.vggt_images, "gather_index": af.gather_index,
                "second_per_grid_t": second_per_grid(af.sampled_fps)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.records)
        for attempt in range(n if self.skip_bad else 1):
            rec = self.records[(i + attempt) % n]
            try:
                return self.encode(rec)
            except RecordError as e:
                if not self.skip_bad:
                    raise
                if rec.id not in self.skipped:
                    logger.warning("skipping bad record: %s", e)
                self.skipped[rec.id] = str(e)
        raise RuntimeError(f"every record failed to load ({len(self.skipped)} bad records)")


# ----------------------------------------------------------------------------------------------- collator
@dataclass
class GeoAlignCollator:
    """Batches samples with different frame counts: left-pads ``input_ids`` / ``labels`` (as the processor does),
    concatenates Qwen's patches and grids, and keeps VGGT frames and ``gather_index`` as per-sample lists.
    The batch's ``ids`` (record ids) are for logging; pop them before calling the model."""

    pad_token_id: int
    group_size: int = 4
    image_pad_id: int | None = None
    mm_token_type_ids: bool | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_processor(cls, processor) -> "GeoAlignCollator":
        from ..processing import IMAGE_PAD, VIDEO_PAD

        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        G = processor.group_size
        return cls(int(pad), G, tok.convert_tokens_to_ids(IMAGE_PAD if G == 4 else VIDEO_PAD))

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        T = max(s["input_ids"].numel() for s in samples)
        B = len(samples)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, s in enumerate(samples):
            n = s["input_ids"].numel()
            ids[b, T - n:] = s["input_ids"]
            labels[b, T - n:] = s["labels"]
            mask[b, T - n:] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        pv = torch.cat([s["pixel_values"] for s in samples])
        grid = torch.cat([s["grid_thw"] for s in samples])
        if self.group_size == 4:
            out["pixel_values"], out["image_grid_thw"] = pv, grid
        else:
            out["pixel_values_videos"], out["video_grid_thw"] = pv, grid
            out["second_per_grid_ts"] = torch.tensor([float(s.get("second_per_grid_t", 1.0)) for s in samples])
        use_mm = self.mm_token_type_ids
        if use_mm is None:
            from ..model_inputs import forward_accepts

            use_mm = self.mm_token_type_ids = forward_accepts("mm_token_type_ids")
        if use_mm and self.image_pad_id is not None:
            out["mm_token_type_ids"] = (ids == self.image_pad_id).to(torch.long) * (1 if self.group_size == 4 else 2)
        out["vggt_pixel_values"] = [s["vggt_pixel_values"] for s in samples]
        out["gather_index"] = [s["gather_index"] for s in samples]
        out["labels"] = labels
        out["ids"] = [s["id"] for s in samples]
        return out
