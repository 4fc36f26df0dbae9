"""Drive a predictor over a benchmark, appending predictions to a JSONL file.

Each finished batch is appended as JSON lines and flushed to disk (fsync), so a crash
loses at most the batch in flight; a rerun with the same output file skips every id
already there (a half-written last line from a crash is dropped first).
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

from .predictor import Predictor, Sample
from .tasks import make_record, score_records


def read_predictions(path: str) -> list[dict]:
    """Records of a predictions JSONL; ignores a truncated last line, keeps the first of duplicate ids."""
    records, seen = [], set()
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # interrupted write at the very end
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON (a corrupt line before the end; only a cut last "
                             "line is recovered)") from None
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ValueError(f"{path}:{i + 1}: a prediction record needs a string 'id', got {line[:80]!r}")
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        records.append(r)
    return records


def _drop_partial_tail(path: str) -> None:
    """Cut a trailing line without newline (an interrupted write) off the file."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def run_eval(samples: Sequence[Sample], predictor: Predictor, out_path: str, *,
             batch_size: int = 1, progress: bool = True, fsync: bool = True) -> dict:
    """Answer every sample not yet in ``out_path``; returns counts and timing."""
    from tqdm.auto import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    _drop_partial_tail(out_path)
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
        with open(out_path, "a", encoding="utf-8") as f:
            for i in range(0, len(todo), bs):
                batch = todo[i:i + bs]
                preds = predictor.predict(batch)
                if len(preds) != len(batch):
                    raise RuntimeError(f"predictor returned {len(preds)} answers for {len(batch)} samples")
                f.write("".join(json.dumps(make_record(s, str(p).strip()), ensure_ascii=False) + "\n"
                                for s, p in zip(batch, preds)))
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
                written += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()
    return {"total": len(samples), "skipped": len(samples) - len(todo), "written": written,
            "seconds": time.time() - t0, "batch_size": bs}


def score_file(task: str, pred_path: str, ids: Sequence[str] | None = None,
               use_java: bool | None = None) -> dict:
    """Scores of the records in ``pred_path`` (only ``ids`` when given)."""
    records = read_predictions(pred_path)
    bad = {r.get("task") for r in records} - {task, None}
    if bad:
        raise ValueError(f"{pred_path} holds predictions of task(s) {sorted(bad)}, not {task!r}")
    if ids is not None:
        keep = set(ids)
        records = [r for r in records if r["id"] in keep]
    return score_records(task, records, use_java=use_java)
