"""Drive a predictor over a benchmark, appending predictions to a JSONL file.

Each finished batch is appended as JSON lines and flushed to disk (fsync; geoalign.atomic_files.append_jsonl), so a
crash loses at most the batch in flight; a rerun with the same output file skips every id already there (a cut last
line from a crash is dropped first). A prediction is stored as the predictor returned it (not stripped): each
benchmark's scoring parses it the way its official code does.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

from ..atomic_files import append_jsonl, drop_cut_tail, read_jsonl
from .predictor import Predictor, Sample
from .tasks import make_record, score_records


def read_predictions(path: str) -> list[dict]:
    """Records of a predictions JSONL; ignores a cut last line (an interrupted append), keeps the first of
    duplicate ids; a corrupt line before the end, or a record without a string id, is a ValueError."""
    records, seen = [], set()
    for line, r in read_jsonl(path, line_numbers=True):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ValueError(f"{path}:{line}: a prediction record needs a string 'id', got {json.dumps(r)[:80]!r}")
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        records.append(r)
    return records


def run_eval(samples: Sequence[Sample], predictor: Predictor, out_path: str, *,
             batch_size: int = 1, progress: bool = True) -> dict:
    """Answer every sample not yet in ``out_path``; returns counts and timing."""
    from tqdm.auto import tqdm

    drop_cut_tail(out_path)
    done = {r["id"] for r in read_predictions(out_path)}
    todo = [s for s in samples if s.id not in done]
    bs = max(1, batch_size)
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
            append_jsonl(out_path, [make_record(s, str(p)) for s, p in zip(batch, preds)])
            written += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    return {"total": len(samples), "skipped": len(samples) - len(todo), "written": written,
            "seconds": time.time() - t0, "batch_size": bs}


def score_file(task: str, pred_path: str, ids: Sequence[str] | None = None, **options) -> dict:
    """Scores of the records in ``pred_path`` (only ``ids`` when given); options: ``tasks.score_records``'."""
    records = read_predictions(pred_path)
    bad = {r.get("task") for r in records} - {task, None}
    if bad:
        raise ValueError(f"{pred_path} holds predictions of task(s) {sorted(bad)}, not {task!r}")
    if ids is not None:
        keep = set(ids)
        records = [r for r in records if r["id"] in keep]
    return score_records(task, records, **options)
