"""Task registry: turn each benchmark's files into :class:`Sample` objects and score records.

Every prediction record (one JSON line) carries what its metric needs, so scoring needs
the predictions file alone:

* vsibench: ``id, task, prediction, question_type, ground_truth, dataset, scene_name, options``
* scanqa:   ``id, task, prediction, answers, scene_id, question``
* sqa3d:    ``id, task, prediction, answers, question_type, scene_id, question``
* gap:      ``id, task, prediction, gap_task, answers, scene`` and ``objects`` (detection) | ``target`` (+ ``query``,
  ``unique``; grounding) | ``box, prompt_box, references, object_id`` (dense captioning) (GAP-MLLM)
"""
from __future__ import annotations

import os
from typing import Callable

from ..geometry.sampling import FRAME_SAMPLING
from ..local_paths import resolve_inside
from . import gap, scanqa, sqa3d, vsibench
from .media import MediaRef, find_scene_media
from .predictor import Sample

TASKS = ("vsibench", "scanqa", "sqa3d", "gap")
DEFAULT_SPLIT = {"vsibench": "test", "scanqa": "val", "sqa3d": "test", "gap": "test"}
DEFAULT_MAX_NEW_TOKENS = {"vsibench": 16, "scanqa": 32, "sqa3d": 32, "gap": 256}


def scene_media_roots(data_dir: str, media_dir: str | None) -> list[str]:
    """Folders searched for ``{scene_id}.mp4`` / ``{scene_id}/`` frames (first hit wins)."""
    if media_dir:
        return [media_dir]
    subs = ("scannet/posed_images", "posed_images", "scannet/videos", "videos",
            "scannet/frames", "frames", "scannet", ".")
    return [os.path.normpath(os.path.join(data_dir, s)) for s in subs]


def _vsibench_samples(docs, data_dir, media_dir, common):
    out = []
    for d in docs:
        path = vsibench.video_path(media_dir or data_dir, d)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VSI-Bench video missing for question {d['id']}: {path} "
                                    "(expected {data}/{dataset}/{scene_name}.mp4; see --media)")
        meta = {"question_type": d["question_type"], "ground_truth": d["ground_truth"],
                "dataset": d["dataset"], "scene_name": d["scene_name"], "options": d.get("options")}
        out.append(Sample(id=str(d["id"]), task="vsibench", prompt=vsibench.build_prompt(d),
                          media=MediaRef(path, "video"), meta=meta, **common))
    return out


def _scene_samples(task, docs, build_prompt, meta_keys, data_dir, media_dir, common):
    roots = scene_media_roots(data_dir, media_dir)
    cache: dict[str, MediaRef] = {}
    out = []
    for d in docs:
        sid = d["scene_id"]
        if sid not in cache:
            cache[sid] = find_scene_media(sid, roots)
        out.append(Sample(id=str(d["question_id"]), task=task, prompt=build_prompt(d), media=cache[sid],
                          meta={k: d[k] for k in meta_keys}, **common))
    return out


def load_samples(task: str, data_dir: str, media_dir: str | None = None, split: str | None = None,
                 num_frames: int = 32, max_new_tokens: int | None = None,
                 prompt_suffix: str | None = None, limit: int | None = None,
                 frame_sampling: str = "linspace-round", vsibench_subset: str = "full",
                 sqa3d_style: str = "default") -> list[Sample]:
    """Samples of a task in dataset order (the first ``limit`` when given).

    Media are located eagerly (a missing scene fails here, with the paths tried) but
    frames are decoded only when a predictor calls ``Sample.load_frames()`` (``num_frames``
    sampled by ``frame_sampling``, one of ``geoalign.geometry.sampling.FRAME_SAMPLING``).
    ``vsibench_subset``: ``vsibench.SUBSETS``; ``sqa3d_style``: ``sqa3d.STYLES`` (prompt, and
    VG-LLM's 16 new tokens when ``max_new_tokens`` is None).
    """
    if frame_sampling not in FRAME_SAMPLING:
        raise ValueError(f"unknown frame sampling {frame_sampling!r}; expected one of {FRAME_SAMPLING}")
    for name, value in (("limit", limit), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None (all), got {value!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    sqa3d.check_style(sqa3d_style)
    split = split or DEFAULT_SPLIT[task]
    if max_new_tokens is None and task == "sqa3d" and sqa3d_style == "vg-llm":
        max_new_tokens = sqa3d.VG_LLM_MAX_NEW_TOKENS
    common = {"num_frames": num_frames, "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task],
              "frame_sampling": frame_sampling}
    if task == "vsibench":
        docs = vsibench.load_docs(data_dir, vsibench_subset)
        docs = docs if limit is None else docs[:limit]
        return _vsibench_samples(docs, data_dir, media_dir, common)
    if task == "scanqa":
        docs = scanqa.load_docs(data_dir, split)
        docs = docs if limit is None else docs[:limit]
        return _scene_samples("scanqa", docs, lambda d: scanqa.build_prompt(d, prompt_suffix),
                              ("answers", "scene_id", "question"), data_dir, media_dir, common)
    if task == "sqa3d":
        docs = sqa3d.load_docs(data_dir, split)
        docs = docs if limit is None else docs[:limit]
        return _scene_samples("sqa3d", docs, lambda d: sqa3d.build_prompt(d, prompt_suffix, sqa3d_style),
                              ("answers", "question_type", "scene_id", "question"), data_dir, media_dir, common)
    if task == "gap":
        docs = gap.load_docs(data_dir, split)
        docs = docs if limit is None else docs[:limit]
        root = media_dir or data_dir
        return [Sample(id=str(d["id"]), task="gap", prompt=gap.prompt(d),
                       media=MediaRef(resolve_inside(root, d["images"], "GAP record images"), "frames"),
                       meta=gap.meta(d), **common)
                for d in docs]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def make_record(sample: Sample, prediction: str) -> dict:
    """The JSON line stored for one answered sample."""
    return {"id": sample.id, "task": sample.task, "prediction": prediction, **sample.meta}


def score_records(task: str, records: list[dict], use_java: bool | None = None,
                  vsibench_parsing: str = vsibench.DEFAULT_PARSING, sqa3d_style: str = "default",
                  scan2cap_style: str = gap.DEFAULT_CAPTION_STYLE) -> dict:
    """Metrics of ``task`` from prediction records (options: see ``vsibench.score`` / ``scanqa.score`` /
    ``sqa3d.score`` / ``gap.score``)."""
    if task == "vsibench":
        return vsibench.score(records, parsing=vsibench_parsing)
    if task == "scanqa":
        return scanqa.score(records, use_java=use_java)
    if task == "sqa3d":
        return sqa3d.score(records, style=sqa3d_style)
    if task == "gap":
        return gap.score(records, use_java=use_java, scan2cap_style=scan2cap_style)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


FORMATTERS: dict[str, Callable[[dict], str]] = {
    "vsibench": vsibench.format_table, "scanqa": scanqa.format_table, "sqa3d": sqa3d.format_table,
    "gap": gap.format_table,
}


def format_scores(task: str, scores: dict) -> str:
    """Human-readable table in the paper's layout."""
    return FORMATTERS[task](scores)
