"""Drive a predictor over a benchmark, appending predictions to a JSONL file.

Each finished batch is appended as JSON lines and flushed to disk (fsync; geoalign.atomic_files.append_jsonl), so a
crash loses at most the batch in flight; a rerun with the same output file skips every id already there (a cut last
line from a crash is dropped first). A prediction is stored as the predictor returned it (not stripped): each
benchmark's scoring parses it the way its official code does.

Sharded runs (``geoalign.eval.distributed``): rank r of N answers the samples at positions i % N == r into its own
shard file ``STEM.rank{r}-of-{N}.jsonl`` beside the predictions file ``STEM.jsonl``, then writes
``STEM.rank{r}-of-{N}.status.json``; :func:`merge_shards` folds every shard into the predictions file in dataset
order. An id already in the predictions file or in any shard file, of any N, is never answered again.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Sequence

from ..atomic_files import append_jsonl, drop_cut_tail, read_jsonl, write_json, write_jsonl
from ..faults import fault_point
from .predictor import Predictor, Sample
from .tasks import make_record, score_records

_SHARD_SUFFIX = re.compile(r"\.rank(\d+)-of-(\d+)\.(jsonl|status\.json)")


def _stem(out_path: str) -> str:
    return out_path[:-6] if out_path.endswith(".jsonl") else out_path


def shard_path(out_path: str, rank: int, world_size: int) -> str:
    """Where rank ``rank`` of ``world_size`` appends its answers."""
    return f"{_stem(out_path)}.rank{rank}-of-{world_size}.jsonl"


def status_path(out_path: str, rank: int, world_size: int) -> str:
    """Where rank ``rank`` of ``world_size`` says it finished (or why it failed)."""
    return f"{_stem(out_path)}.rank{rank}-of-{world_size}.status.json"


def shard_files(out_path: str, kind: str = "jsonl") -> list[tuple[int, int, str]]:
    """(world_size, rank, path) of every shard (``kind="jsonl"``) or status (``"status.json"``) file of
    ``out_path``, whatever its N, sorted."""
    folder, base = os.path.split(os.path.abspath(_stem(out_path)))
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _SHARD_SUFFIX.fullmatch(name[len(base):]) if name.startswith(base) else None
        if m and m.group(3) == kind:
            found.append((int(m.group(2)), int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def remove_shards(out_path: str, kinds: Sequence[str] = ("jsonl", "status.json")) -> None:
    """Delete the shard and/or status files of ``out_path``."""
    for kind in kinds:
        for _, _, path in shard_files(out_path, kind):
            os.remove(path)


def _starts_like_json_array(path: str) -> bool:
    """True when the first non-blank line of ``path`` starts with '[' (a JSON array, not JSONL)."""
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("[")
    return False


def read_predictions(path: str) -> list[dict]:
    """Records of a predictions JSONL; ignores a cut last line (an interrupted append), keeps the first of
    duplicate ids; a corrupt line before the end, a record without a string id, or a file that starts like a JSON
    array ('[') is a ValueError."""
    if _starts_like_json_array(path):
        raise ValueError(f"{path} looks like a JSON array (it starts with '['); predictions must be JSONL: one JSON "
                         f"object per line")
    records, seen = [], set()
    for line, r in read_jsonl(path, line_numbers=True):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ValueError(f"{path}:{line}: a prediction record needs a string 'id', got {json.dumps(r)[:80]!r}")
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        records.append(r)
    return records


def answered_ids(out_path: str, rank: int = 0, world_size: int = 1) -> set[str]:
    """Ids answered in ``out_path`` or its shard files, as rank ``rank`` of ``world_size`` sees them: the shards of
    the other ranks of this N are left out (written while it reads, and holding only their own positions)."""
    paths = [out_path] + [p for n, r, p in shard_files(out_path) if n != world_size or r == rank]
    return {r["id"] for p in paths for r in read_predictions(p)}


def run_eval(samples: Sequence[Sample], predictor: Predictor, out_path: str, *,
             batch_size: int = 1, progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Answer every sample of this rank (positions i with i % world_size == rank) not yet answered (see
    :func:`answered_ids`), appending to ``out_path`` (one process) or to this rank's shard file; returns counts and
    timing."""
    from tqdm.auto import tqdm

    target = out_path if world_size == 1 else shard_path(out_path, rank, world_size)
    drop_cut_tail(target)
    done = answered_ids(out_path, rank, world_size)
    mine = list(samples)[rank::world_size]
    todo = [s for s in mine if s.id not in done]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    bs = batch_size
    cap = getattr(predictor, "max_batch_size", None)
    if cap:
        bs = min(bs, int(cap))
    t0 = time.time()
    bar = tqdm(total=len(todo), desc=f"{samples[0].task if samples else 'eval'}",
               unit="q", disable=not progress, dynamic_ncols=True)
    written = 0
    try:
        for i in range(0, len(todo), bs):
            batch = todo[i:i + bs]
            preds = predictor.predict(batch)
            if len(preds) != len(batch):
                raise RuntimeError(f"predictor returned {len(preds)} answers for {len(batch)} samples")
            records = [make_record(s, str(p)) for s, p in zip(batch, preds)]
            extras = getattr(predictor, "last_extras", None)        # e.g. routing (--save-routing)
            if extras:
                if len(extras) != len(batch):
                    raise RuntimeError(f"predictor gave extras for {len(extras)} of {len(batch)} samples")
                for rec, extra in zip(records, extras):
                    rec.update(extra)
            append_jsonl(target, records)
            fault_point("eval-answered")
            written += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    return {"total": len(mine), "skipped": len(mine) - len(todo), "written": written,
            "seconds": time.time() - t0, "batch_size": bs}


def write_status(out_path: str, rank: int, world_size: int, status: dict) -> None:
    """Rank ``rank``'s end-of-run status: ``{"ok": True, **run_eval's counts}`` or ``{"ok": False, "error": ...}``."""
    write_json(status_path(out_path, rank, world_size), status)


def wait_for_ranks(out_path: str, world_size: int, poll_s: float = 1.0) -> dict[int, dict]:
    """Rank 0: the statuses of ranks 1..N-1 of this run, waiting until each has written one, or returning early
    (with those present) as soon as one reports a failure."""
    got: dict[int, dict] = {}
    while True:
        for r in range(1, world_size):
            path = status_path(out_path, r, world_size)
            if r not in got and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    got[r] = json.load(f)
        if len(got) == world_size - 1 or any(not st.get("ok") for st in got.values()):
            return got
        time.sleep(poll_s)


def merge_shards(out_path: str, ids: Sequence[str]) -> int:
    """Fold every shard file into ``out_path``: the records of ``ids`` in that order, then any other record it held
    (first occurrence of an id wins, the predictions file first); the shard and status files are removed. Returns
    the number of shard files merged (0: nothing changed)."""
    shards = [p for _, _, p in shard_files(out_path)]
    if shards:
        by_id: dict[str, dict] = {}
        for path in [out_path] + shards:
            for r in read_predictions(path):
                by_id.setdefault(r["id"], r)
        ordered = [by_id.pop(i) for i in ids if i in by_id]
        write_jsonl(out_path, ordered + list(by_id.values()))
    remove_shards(out_path)
    return len(shards)


def score_file(task: str, pred_path: str, ids: Sequence[str] | None = None, **options) -> dict:
    """Scores of the records in ``pred_path`` (only ``ids`` when given); options: ``tasks.score_records``' (e.g.
    ``vsibench_parsing``, one of ``vsibench.PARSINGS``, default official; recorded as the scores' ``"parsing"``).
    A file without records (or without any of ``ids``) is a ValueError "FILE holds no predictions", whatever the
    task."""
    records = read_predictions(pred_path)
    if not records:
        raise ValueError(f"{pred_path} holds no predictions")
    bad = {r.get("task") for r in records} - {task, None}
    if bad:
        raise ValueError(f"{pred_path} holds predictions of task(s) {sorted(bad)}, not {task!r}")
    if ids is not None:
        keep = set(ids)
        records = [r for r in records if r["id"] in keep]
        if not records:
            raise ValueError(f"{pred_path} holds no predictions (none of the {len(keep)} questions asked for)")
    return score_records(task, records, **options)
