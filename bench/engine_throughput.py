"""Questions per minute of `geoalign eval`'s two engines, transformers' generate and vLLM, on the same model, the
same questions and the same machine, in one run (vLLM's own environment: bash .ci/vllm makes it).

    python -m bench.engine_throughput --out bench/results/cpu/engine_throughput.json
        [--model DIR --data VSIBENCH_DIR] [--rooms 4 --num-frames 8 --batch-sizes 1,8 --vllm-batch 64]

Without --model / --data it builds the tiny random GeoAlign model with 32-wide text heads (G = 4; vLLM's CPU
attention needs >= 32) and a synthetic VSI-Bench folder of ``--rooms`` procedural rooms (geoalign.demo's questions,
one video per room). Each engine answers every question through the eval runner into its own predictions file
(greedy, ``--num-frames`` frames); the figures are model loading / engine start-up, answering time and questions
per minute of answering, and how many answers the two files share (they should all be equal). Each engine runs in
a subprocess of its own, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def write_rooms(root: str, rooms: int) -> int:
    """A VSI-Bench folder of ``rooms`` procedural rooms (geoalign.demo's); returns the number of questions."""
    from geoalign.demo import HEIGHT, NUM_FRAMES, WIDTH, write_vsibench
    from geoalign.gap.procedural import make_box_room

    return write_vsibench([make_box_room(seed=k, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_boxes=4)
                           for k in range(rooms)], root)


def write_model(path: str, group_size: int) -> None:
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model

    model, tok = tiny_model(group_size=group_size, seed=0, text_head_dim=32)
    model.save_pretrained(path, processor=GeoAlignProcessor(tok, None, group_size=group_size))


def run_engine(engine: str, model: str, data: str, out: str, num_frames: int, batch_size: int,
               dtype: str = "float32") -> dict:
    """One engine, in this process: load, then answer every question (the eval runner); the timings."""
    from geoalign.eval.runner import run_eval
    from geoalign.eval.tasks import load_samples

    samples = load_samples("vsibench", data, num_frames=num_frames)
    t0 = time.perf_counter()
    if engine == "vllm":
        from geoalign.vllm.engine import load_vllm_predictor

        predictor = load_vllm_predictor(model, dtype=dtype, max_batch_size=batch_size, num_frames=num_frames)
    else:
        from geoalign.eval.predictor import load_predictor

        predictor = load_predictor(model, dtype=dtype, max_batch_size=batch_size)   # cuda when there is one
    loaded = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_eval(samples, predictor, out, batch_size=batch_size, progress=False)
    answered = time.perf_counter() - t1
    import torch

    return {"engine": engine, "batch_size": batch_size, "questions": len(samples), "load_s": round(loaded, 2),
            "answer_s": round(answered, 2), "questions_per_min": round(60 * len(samples) / answered, 1),
            "torch_threads_in_this_process": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--model", help="a GeoAlign model directory (default: the tiny one, built)")
    p.add_argument("--data", help="a VSI-Bench folder (default: --rooms procedural rooms, built)")
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4, choices=[4, 8], help="G of the built tiny model")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="both engines' dtype (float32, bfloat16, ...)")
    p.add_argument("--batch-sizes", default="1,8", help="transformers engine batch sizes (comma-separated)")
    p.add_argument("--vllm-batch", type=int, default=64)
    p.add_argument("--one", nargs=4, metavar=("ENGINE", "BATCH", "PREDICTIONS", "JSON"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:                                           # a child: one engine
        engine, batch, predictions, result = a.one
        from geoalign.atomic_files import write_json

        write_json(result, run_engine(engine, a.model, a.data, predictions, a.num_frames, int(batch), a.dtype))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the same threads for both engines: vLLM's CPU worker drops torch to one thread fewer than the cores unless
    # OMP_NUM_THREADS says otherwise
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    with tempfile.TemporaryDirectory(prefix="engine-throughput-") as tmp:
        model = a.model or os.path.join(tmp, "model")
        data = a.data or os.path.join(tmp, "vsibench")
        if not a.model:
            write_model(model, a.group_size)
        if not a.data:
            write_rooms(data, a.rooms)
        import torch

        runs = [("transformers", int(b), None) for b in a.batch_sizes.split(",")] + [("vllm", a.vllm_batch, None)]
        if not torch.cuda.is_available():   # vLLM's CPU worker binds to all cores but one (kept for its front end)
            runs.append(("vllm", a.vllm_batch, f"0-{os.cpu_count() - 1}"))
        rows, answers = [], {}
        for engine, batch, bind in runs:
            name = f"{engine}-{batch}-{'all' if bind else 'default'}"
            predictions, result = os.path.join(tmp, f"{name}.jsonl"), os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, "-m", "bench.engine_throughput", "--out", a.out, "--model", model, "--data", data,
                   "--num-frames", str(a.num_frames), "--dtype", a.dtype, "--one", engine, str(batch), predictions,
                   result]
            env = dict(os.environ, **({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {}))
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            with open(result) as f:
                row = json.load(f)
            row["process_s"] = round(time.perf_counter() - t0, 2)
            if engine == "vllm":
                row["vllm_cpu_omp_threads_bind"] = bind or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            with open(predictions) as f:
                answers[name] = [json.loads(line)["prediction"] for line in f]
            rows.append(row)
            print(json.dumps(row))
        ref = answers[next(iter(answers))]
        for row, key in zip(rows, answers):
            row["answers_equal_to_transformers_b%d" % runs[0][1]] = sum(x == y for x, y in zip(answers[key], ref))
            row["ratio_vs_transformers_b1"] = round(row["questions_per_min"] / rows[0]["questions_per_min"], 2)
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}", "torch": torch.__version__,
           "model": a.model or f"tiny random GeoAlign (G={a.group_size}, text head_dim 32)",
           "questions": rows[0]["questions"], "num_frames": a.num_frames, "dtype": a.dtype, "rows": rows}
    try:
        import vllm

        doc["vllm"] = vllm.__version__
    except ImportError:
        pass
    from geoalign.atomic_files import write_json

    write_json(a.out, doc)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
