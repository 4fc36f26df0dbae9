"""The bad-input table: every rejected input the package documents, driven one row at a time.

CASES below is the single source of truth: each row has an id, what is wrong, the call that receives it, and the
error it must give (exception type and a verbatim fragment of its message). README.md's "Bad inputs" table is
rendered from CASES (`python tests/test_bad_inputs.py` prints it) and test_readme_table_is_current checks that
the README holds exactly that table, so the documentation and the behaviour cannot drift apart.

A row passes when the call raises that exception type with that fragment in its message. The few rows that are
recoveries rather than rejections (a predictions file cut mid-line by a crash) say so and check the recovery.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from geoalign import GeoAlignConfig
from geoalign.backends import available_backends
from geoalign_kernels.guard import GuardError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_helpers import EmulatedExt  # noqa: E402
from helpers import Shape, make_fusion, make_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = Shape(L=5, M=3, K=2, G=4)  # D=24, D'=20, H=36, N=40 rows per layer
HAS_TRITON = "triton" in available_backends(torch.device("cpu"))


@dataclass(frozen=True)
class Case:
    area: str
    what: str
    call: Callable  # call(tmp_path) raises (or, for a recovery, returns normally)
    error: type | None  # None: a documented recovery, not an error
    fragment: str  # verbatim part of the message (or of the recovery's description)
    needs_triton: bool = False


def fusion_and_inputs():
    fusion = make_fusion(SHAPE, torch.float32)
    q, layers, gi = make_inputs(SHAPE, torch.float32)
    return fusion, q.detach(), layers, gi


def forward_with(**change):
    """A fusion forward whose inputs are valid except for `change` (q, layers, gather_index, backend, ...)."""
    def call(_tmp):
        fusion, q, layers, gi = fusion_and_inputs()
        args = dict(q=q, layers=layers, gather_index=gi)
        extra = {}
        for key, value in change.items():
            value = value(fusion, q, layers, gi) if callable(value) else value
            (args if key in args else extra)[key] = value
        fusion(args["q"], args["layers"], args["gather_index"], **extra)
    return call


def stream_misuse(kind):
    def call(_tmp):
        fusion, q, layers, gi = fusion_and_inputs()
        stream = fusion.begin(q, gi)
        if kind == "twice":
            stream.add(1, layers[1])
            stream.add(1, layers[1])
        elif kind == "position":
            stream.add(3, layers[0])
        elif kind == "after-finish":
            for i, layer in enumerate(layers):
                stream.add(i, layer)
            stream.finish()
            stream.add(0, layers[0])
    return call


def config(**kw):
    def call(_tmp):
        base = dict(hidden_size=24, geo_dim=20, bank_layers=(0, 1, 2), top_k=2, projector_hidden=36, router_hidden=12)
        base.update(kw)
        GeoAlignConfig(**base)
    return call


def bank_layer_forward_with(**change):
    def call(_tmp):
        from geoalign_kernels.bank import bank_layer_forward

        L, K, G, Dg, H, N = 6, 2, 4, 8, 16, 30
        args = dict(h_bar=torch.zeros(L, H), alpha=torch.rand(L, K), ln_weight=torch.ones(Dg),
                    ln_bias=torch.zeros(Dg), fc1_weight=torch.randn(H, G * Dg), fc1_bias=torch.zeros(H),
                    layer=torch.randn(N, Dg), tokens=torch.arange(L), slots=torch.zeros(L, dtype=torch.int64),
                    offsets=torch.tensor([0, L]), layer_pos=0, gather_index=torch.randint(0, N, (L, G)), eps=1e-5,
                    x_hat=torch.zeros(0, G * Dg), x=torch.zeros(L, G * Dg), affine=torch.zeros(2, 0, Dg), tape=False)
        args.update({k: v() if callable(v) else v for k, v in change.items()})
        n = args["tokens"].shape[0]
        if n != L and "offsets" not in change:
            args["offsets"], args["x"] = torch.tensor([0, n]), torch.zeros(min(L, n), G * Dg)
        bank_layer_forward(**args)
    return call


def bank_rows_with(topk_idx, num_layers=3):
    def call(_tmp):
        from geoalign_kernels.bank import bank_rows

        bank_rows(topk_idx(), num_layers)
    return call


def bank_tape_forward_with(**change):
    def call(_tmp):
        from geoalign_kernels.bank import bank_tape_forward

        L, K, G, Dg, H = 6, 2, 4, 8, 16
        args = dict(h_bar=torch.zeros(L, H), alpha=torch.rand(L, K), fc1_weight=torch.randn(H, G * Dg),
                    fc1_bias=torch.zeros(H), positions=torch.arange(L * K), x=torch.zeros(L * K, G * Dg),
                    z=torch.zeros(L * K, H))
        args.update({k: v() for k, v in change.items()})
        bank_tape_forward(**args)
    return call


def route_forward_k(k):
    def call(_tmp):
        from geoalign_kernels.routing import route_forward

        route_forward(torch.randn(5, 4), torch.randn(3, 4), torch.randn(3), k)
    return call


def matmul_mismatch(_tmp):
    from geoalign_kernels.gemm import matmul

    matmul(torch.randn(4, 5), torch.randn(6, 3))


def output_bad_w_out(_tmp):
    from geoalign_kernels.output import output_forward

    output_forward(torch.randn(5, 8), torch.randn(5, 12), torch.randn(8, 12), torch.randn(8), torch.randn(8, 9))


def cuda_op(kind):
    def call(_tmp):
        from geoalign_kernels.cuda import extension as cuda_extension, ops as cuda_ops

        old = cuda_extension.EXT_OVERRIDE
        cuda_extension.EXT_OVERRIDE = EmulatedExt()
        try:
            if kind == "M>32":
                cuda_ops.cuda_route(torch.randn(3, 33), 2)
            elif kind == "ln-shape":
                cuda_ops.cuda_gather_layer_norm(torch.randn(8, 6), torch.zeros(2, 4, dtype=torch.int64),
                                                torch.zeros(1, dtype=torch.int64), torch.ones(5), torch.zeros(5),
                                                1e-5, False)
        finally:
            cuda_extension.EXT_OVERRIDE = old
    return call


def cuda_backend_here(_tmp):
    from geoalign.backends.cuda_backend import CudaBackend

    CudaBackend()


# ----------------------------------------------------------------------------------------------------- files
def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def vggt_checkpoint(kind):
    def call(tmp):
        from geoalign.geometry.checkpoint import read_aggregator_state_dict

        if kind == "missing":
            read_aggregator_state_dict(tmp / "nope.safetensors")
        elif kind == "truncated":
            from safetensors.torch import save_file

            save_file({"aggregator.x": torch.randn(64, 64)}, str(tmp / "model.safetensors"))
            data = (tmp / "model.safetensors").read_bytes()
            write(tmp / "model.safetensors", data[: len(data) // 2])
            read_aggregator_state_dict(tmp / "model.safetensors")
        elif kind == "format":
            read_aggregator_state_dict(write(tmp / "model.onnx", b"\0" * 16))
        elif kind == "empty-dir":
            read_aggregator_state_dict(tmp)
    return call


def frames_from(kind):
    def call(tmp):
        from geoalign.geometry.frames import load_frames

        if kind == "missing":
            load_frames(tmp / "scene.mp4")
        elif kind == "corrupt-video":
            load_frames(write(tmp / "scene.mp4", b"not a video at all" * 100))
        elif kind == "empty-folder":
            (tmp / "frames").mkdir()
            load_frames(tmp / "frames")
        elif kind == "corrupt-image":
            write(tmp / "frames" / "0001.jpg", b"\xff\xd8\xff garbage")
            load_frames(tmp / "frames")
    return call


def fusion_dir(kind):
    def call(tmp):
        from geoalign.modeling import load_fusion, save_fusion

        save_fusion(make_fusion(SHAPE, torch.float32), tmp / "fusion")
        weights = tmp / "fusion" / "fusion.safetensors"
        if kind == "no-weights":
            weights.unlink()
        elif kind == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif kind == "mismatch":
            save_fusion(make_fusion(Shape(L=5, M=3, K=2, G=4, H=40), torch.float32), tmp / "other")
            os.replace(tmp / "other" / "fusion.safetensors", weights)
        load_fusion(tmp / "fusion")
    return call


def model_dir(kind):
    def call(tmp):
        from geoalign.modeling import GeoAlignForConditionalGeneration

        if kind == "missing":
            GeoAlignForConditionalGeneration.from_pretrained(tmp / "run")
        elif kind == "not-geoalign":
            write(tmp / "run" / "geoalign_model.json", json.dumps({"format": "other"}).encode())
            GeoAlignForConditionalGeneration.from_pretrained(tmp / "run")
    return call


def train_config(kind):
    def call(tmp):
        from geoalign.training.config import TrainConfig

        if kind == "missing":
            TrainConfig.from_yaml(tmp / "train.yaml")
        elif kind == "unknown-key":
            TrainConfig.from_yaml(write(tmp / "train.yaml", b"learning_rat: 1.0e-5\n"))
        elif kind == "not-mapping":
            TrainConfig.from_yaml(write(tmp / "train.yaml", b"- a\n- b\n"))
    return call


def train_data(kind):
    def call(tmp):
        from geoalign.training.data import load_records

        if kind == "not-json":
            load_records([write(tmp / "data.json", b"[{\"video\": ")])
        elif kind == "missing":
            load_records([tmp / "data.json"])
        elif kind == "no-media":
            rec = {"id": "r1", "video": "none.mp4", "conversations": [{"from": "human", "value": "q"},
                                                                      {"from": "gpt", "value": "a"}]}
            load_records([write(tmp / "data.json", json.dumps([rec]).encode())], media_root=str(tmp))
    return call


def resume_from(kind):
    def call(tmp):
        from geoalign.training.checkpoint import resolve_resume

        if kind == "half-written":
            write(tmp / "run" / "checkpoint-10" / "trainable.safetensors", b"")  # no trainer_state.json yet
            resolve_resume(str(tmp / "run" / "checkpoint-10"), str(tmp / "run"))
        elif kind == "missing":
            resolve_resume(str(tmp / "run" / "checkpoint-99"), str(tmp / "run"))
    return call


def predictions(kind):
    def call(tmp):
        from geoalign.eval.runner import read_predictions

        good = json.dumps({"id": "q1", "task": "sqa3d", "prediction": "yes"})
        if kind == "corrupt-middle":
            read_predictions(str(write(tmp / "p.jsonl", f"{good}\n{{\"id\": \"q2\", \n{good}\n".encode())))
        elif kind == "no-id":
            read_predictions(str(write(tmp / "p.jsonl", b'{"task": "sqa3d", "prediction": "yes"}\n')))
        elif kind == "cut-last-line":
            from geoalign.eval.predictor import Sample
            from geoalign.eval.runner import run_eval

            path = write(tmp / "p.jsonl", f'{good}\n{{"id": "q2", "task": "sq'.encode())

            class Echo:
                def predict(self, batch):
                    return ["no"] * len(batch)

            samples = [Sample(id=i, task="sqa3d", prompt="?", media=None) for i in ("q1", "q2")]
            run_eval(samples, Echo(), str(path), progress=False)
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert [r["id"] for r in lines] == ["q1", "q2"] and lines[1]["prediction"] == "no"
    return call


def no_query(_tmp):
    fusion, q, layers, gi = fusion_and_inputs()
    fusion(q[:0], layers, gi[:0])


D, Dg = SHAPE.D, SHAPE.Dg
CASES: dict[str, Case] = {
    # ---- the fusion op: q [L, D], M layers [N, D'], gather_index [L, G]
    "q-type": Case("fusion", "q is not a tensor", forward_with(q=lambda f, q, l, g: q.tolist()), TypeError,
                   f"q must be a torch.Tensor [L, {D}], got list"),
    "q-shape": Case("fusion", "q has the wrong width", forward_with(q=lambda f, q, l, g: q[:, :-1]), ValueError,
                    f"q must have shape [L, {D}], got (5, {D - 1})"),
    "q-empty": Case("fusion", "q has no rows (L = 0)", no_query, ValueError, "q is empty (L=0)"),
    "q-dtype": Case("fusion", "q's dtype differs from the parameters'", forward_with(q=lambda f, q, l, g: q.double()),
                    TypeError, "q must have the fusion's parameter dtype torch.float32, got torch.float64"),
    "q-device": Case("fusion", "q on another device than the parameters",
                     forward_with(q=lambda f, q, l, g: q.to("meta")), ValueError,
                     "q must be on the fusion's device cpu, got meta"),
    "q-nan": Case("fusion", "q holds NaN or inf", forward_with(q=lambda f, q, l, g: q.index_fill(0, torch.tensor([2]),
                                                                                                float("nan"))),
                  ValueError, "q contains NaN or inf"),
    "gather-dtype": Case("fusion", "gather_index is not an integer tensor",
                         forward_with(gather_index=lambda f, q, l, g: g.float()), TypeError,
                         "gather_index must be int64 (or int32), got torch.float32"),
    "gather-shape": Case("fusion", "gather_index is not [L, G]", forward_with(gather_index=lambda f, q, l, g: g[:, :3]),
                         ValueError, "gather_index must have shape [L, G]=[5, 4], got (5, 3)"),
    "gather-negative": Case("fusion", "gather_index holds a negative row",
                            forward_with(gather_index=lambda f, q, l, g: g - 100), ValueError,
                            "gather_index out of range: expected rows >= 0"),
    "gather-past-layer": Case("fusion", "gather_index points past a layer's rows",
                              forward_with(gather_index=lambda f, q, l, g: g + 40), ValueError,
                              "gather_index out of range: it points at row"),
    "layer-width": Case("fusion", "a bank layer has the wrong width",
                        forward_with(layers=lambda f, q, l, g: [x[:, :-1] for x in l]), ValueError,
                        f"bank layer 0 must have shape [N, {Dg}], got (40, {Dg - 1})"),
    "layer-dtype": Case("fusion", "a bank layer is an integer tensor",
                        forward_with(layers=lambda f, q, l, g: [x.long() for x in l]), TypeError,
                        "bank layer 0 must be a floating-point tensor, got torch.int64"),
    "layer-grad": Case("fusion", "a bank layer requires grad (VGGT is frozen)",
                       forward_with(layers=lambda f, q, l, g: [x.requires_grad_() for x in l]), ValueError,
                       "bank layer 0 requires grad, but the geometry encoder is frozen"),
    "layers-few": Case("fusion", "fewer than M bank layers", forward_with(layers=lambda f, q, l, g: l[:2]), ValueError,
                       "expected 3 bank layers, got 2; missing bank positions [2]"),
    "layers-many": Case("fusion", "more than M bank layers", forward_with(layers=lambda f, q, l, g: l + l[:1]),
                        ValueError, "expected 3 bank layers, got more"),
    "layers-none": Case("fusion", "no bank layers at all", forward_with(layers=lambda f, q, l, g: []), ValueError,
                        "expected 3 bank layers, got 0"),
    "stream-twice": Case("fusion", "the same bank layer added twice to a stream", stream_misuse("twice"), ValueError,
                         "bank layer 1 was already added to this stream"),
    "stream-position": Case("fusion", "a bank position outside [0, M)", stream_misuse("position"), ValueError,
                            "bank position must be an int in [0, 3), got 3"),
    "stream-finished": Case("fusion", "a layer added after finish()", stream_misuse("after-finish"), RuntimeError,
                            "this FusionStream has finished"),
    "backend-name": Case("fusion", "an unknown backend name", forward_with(backend="fast"), ValueError,
                         "unknown backend 'fast'"),
    "fold-reference": Case("fusion", "fold_output with the reference backend",
                           forward_with(backend="reference", fold_output=True), ValueError,
                           "fold_output is a fast-path option"),
    # ---- configuration
    "k-gt-m": Case("config", "top_k larger than the bank (K > M)", config(top_k=4), ValueError,
                   "top_k must be <= the number of bank layers M=3, got K=4"),
    "k-zero": Case("config", "top_k = 0", config(top_k=0), ValueError, "GeoAlignConfig.top_k must be a positive int"),
    "bank-empty": Case("config", "an empty bank", config(bank_layers=()), ValueError,
                       "bank_layers must name at least one layer"),
    "bank-repeat": Case("config", "a bank layer listed twice", config(bank_layers=(0, 1, 1)), ValueError,
                        "bank_layers has repeated layers"),
    "eps": Case("config", "layer_norm_eps <= 0", config(layer_norm_eps=0.0), ValueError,
                "GeoAlignConfig.layer_norm_eps must be > 0"),
    "single-layer": Case("config", "feature_usage='single' with a layer outside the bank",
                         config(feature_usage="single", single_layer=7), ValueError,
                         "GeoAlignConfig.single_layer=7 is not in the bank"),
    # ---- kernel launchers (host checks, no device sync; ids checked in guard mode)
    "launch-h-dtype": Case("kernels", "bank_layer_forward: h_bar not fp32", bank_layer_forward_with(h_bar=lambda: torch.zeros(6, 16,
                           dtype=torch.float16)), TypeError, "bank_layer_forward: h_bar must be float32, got float16", True),
    "launch-h-shape": Case("kernels", "bank_layer_forward: h_bar not [L, H]", bank_layer_forward_with(h_bar=lambda: torch.zeros(7, 16)),
                           ValueError, "bank_layer_forward: h_bar must have shape [6, 16], got [7, 16]", True),
    "launch-w1": Case("kernels", "bank_layer_forward: fc1_weight not [H, G*D']",
                      bank_layer_forward_with(fc1_weight=lambda: torch.randn(16, 31)), ValueError,
                      "bank_layer_forward: fc1_weight must have shape [*, 32], got [16, 31]", True),
    "launch-pairs": Case("kernels", "bank_layer_forward: more pairs than L*K",
                         bank_layer_forward_with(tokens=lambda: torch.arange(13) % 6, slots=lambda: torch.zeros(13, dtype=torch.int64)),
                         ValueError, "bank_layer_forward: 13 routed pairs for L=6 tokens with K=2 slots each", True),
    "launch-token-range": Case("kernels", "bank_layer_forward: a token id past h_bar (guard mode)",
                               bank_layer_forward_with(tokens=lambda: torch.tensor([0, 1, 2, 3, 4, 6])), GuardError,
                               "bank_layer_forward: tokens must lie in [0, 6) (rows of h_bar), got values in [0, 6]", True),
    "launch-gather-range": Case("kernels", "bank_layer_forward: a gather row past the layer (guard mode)",
                                bank_layer_forward_with(gather_index=lambda: torch.full((6, 4), 30)), GuardError,
                                "bank_layer_forward: gather_index must lie in [0, 30) (rows of the layer)", True),
    "launch-x": Case("kernels", "bank_layer_forward: GEMM1 operand buffer x too small",
                     bank_layer_forward_with(x=lambda: torch.zeros(5, 32)), ValueError,
                     "bank_layer_forward: x must have shape [6, 32], got [5, 32]", True),
    "launch-layer-pos": Case("kernels", "bank_layer_forward: a bank layer past the offsets",
                             bank_layer_forward_with(layer_pos=1), ValueError,
                             "bank_layer_forward: layer_pos must be in [0, 0], got 1", True),
    "launch-rows-empty": Case("kernels", "bank_rows: no routes", bank_rows_with(lambda: torch.zeros(0, 2, dtype=torch.int64)),
                              ValueError, "bank_rows: topk_idx must be a non-empty [L, K], got [0, 2]", True),
    "launch-rows-range": Case("kernels", "bank_rows: a route past the bank (guard mode)",
                              bank_rows_with(lambda: torch.tensor([[0, 3]])), GuardError,
                              "bank_rows: topk_idx must lie in [0, 3) (bank layers), got values in [0, 3]", True),
    "launch-tape-positions": Case("kernels", "bank_tape_forward: positions not [L*K]",
                                  bank_tape_forward_with(positions=lambda: torch.arange(11)), ValueError,
                                  "bank_tape_forward: positions must have shape [12], got [11]", True),
    "launch-tape-x": Case("kernels", "bank_tape_forward: x not [L*K, G*D']",
                          bank_tape_forward_with(x=lambda: torch.zeros(12, 31)), ValueError,
                          "bank_tape_forward: x must have shape [12, 32], got [12, 31]", True),
    "launch-k": Case("kernels", "route_forward: K > M", route_forward_k(4), ValueError,
                     "route_forward: k must be in [1, 3], got 4", True),
    "launch-matmul": Case("kernels", "matmul: inner dimensions differ", matmul_mismatch, ValueError,
                          "matmul: b must have shape [5, *], got [6, 3]", True),
    "launch-output": Case("kernels", "output_forward: W_out not [D, D]", output_bad_w_out, ValueError,
                          "output_forward: W_out must have shape [8, 8], got [8, 9]", True),
    "cuda-m": Case("kernels", "cuda router: more than 32 bank layers", cuda_op("M>32"), ValueError,
                   "cuda_route: the CUDA router handles 1..32 bank layers, got M=33"),
    "cuda-ln": Case("kernels", "cuda gather+LN: LayerNorm weight not [D']", cuda_op("ln-shape"), ValueError,
                    "LayerNorm weight/bias must be [6], got (5,)/(5,)"),
    "cuda-missing": Case("kernels", "backend='cuda' without a CUDA build / extension", cuda_backend_here, RuntimeError,
                         "backend='cuda' is unavailable"),
    # ---- files
    "vggt-missing": Case("files", "VGGT checkpoint path does not exist", vggt_checkpoint("missing"), FileNotFoundError,
                         "VGGT checkpoint not found"),
    "vggt-dir": Case("files", "VGGT directory without model.safetensors / model.pt", vggt_checkpoint("empty-dir"),
                     FileNotFoundError, "no VGGT checkpoint in directory"),
    "vggt-truncated": Case("files", "VGGT safetensors cut short", vggt_checkpoint("truncated"), ValueError,
                           "cannot read safetensors checkpoint"),
    "vggt-format": Case("files", "VGGT checkpoint of an unknown format", vggt_checkpoint("format"), ValueError,
                        "unsupported checkpoint format"),
    "video-missing": Case("files", "video or frame folder does not exist", frames_from("missing"), FileNotFoundError,
                          "frame source not found"),
    "video-corrupt": Case("files", "video file that does not decode", frames_from("corrupt-video"), ValueError,
                          "scene.mp4"),
    "folder-empty": Case("files", "image folder without images", frames_from("empty-folder"), ValueError,
                         "holds no images"),
    "image-corrupt": Case("files", "an image that does not decode", frames_from("corrupt-image"), ValueError,
                          "cannot read image"),
    "fusion-no-weights": Case("files", "fusion directory without fusion.safetensors", fusion_dir("no-weights"),
                              FileNotFoundError, "GeoAlign fusion weights not found"),
    "fusion-truncated": Case("files", "fusion.safetensors cut short (a half-written save)", fusion_dir("truncated"),
                             ValueError, "cannot read fusion weights"),
    "fusion-mismatch": Case("files", "fusion weights that do not fit its config", fusion_dir("mismatch"), ValueError,
                            "shape mismatches"),
    "model-missing": Case("files", "model directory does not exist", model_dir("missing"), FileNotFoundError,
                          "GeoAlign model directory not found"),
    "model-manifest": Case("files", "model directory of another format", model_dir("not-geoalign"), ValueError,
                           "is not a GeoAlign model manifest"),
    "train-config-missing": Case("files", "training YAML does not exist", train_config("missing"), FileNotFoundError,
                                 "training config not found"),
    "train-config-key": Case("files", "training YAML with a misspelt key", train_config("unknown-key"), ValueError,
                             "unknown training config keys: ['learning_rat']"),
    "train-config-list": Case("files", "training YAML that is not a mapping", train_config("not-mapping"), ValueError,
                              "must be a YAML mapping of keys to values"),
    "train-data-json": Case("files", "training data that is not JSON", train_data("not-json"), ValueError,
                            "is not valid JSON"),
    "train-data-missing": Case("files", "training data file does not exist", train_data("missing"), FileNotFoundError,
                               "training data file not found"),
    "train-data-media": Case("files", "a training record whose video is missing", train_data("no-media"),
                             FileNotFoundError, "media not found"),
    "resume-half-written": Case("files", "resume from a half-written checkpoint", resume_from("half-written"),
                                ValueError, "is not a complete checkpoint"),
    "resume-missing": Case("files", "resume from a checkpoint that does not exist", resume_from("missing"),
                           FileNotFoundError, "is not a directory"),
    "predictions-corrupt": Case("files", "predictions JSONL with a corrupt line before the end",
                                predictions("corrupt-middle"), ValueError, "p.jsonl:2: not valid JSON"),
    "predictions-no-id": Case("files", "predictions JSONL record without an id", predictions("no-id"), ValueError,
                              "p.jsonl:1: a prediction record needs a string 'id'"),
    "predictions-cut": Case("files", "predictions JSONL cut mid-line by a crash", predictions("cut-last-line"), None,
                            "recovered: the partial last line is dropped and that question answered again"),
}


def render_table() -> str:
    lines = ["| id | area | rejected input | error |", "| --- | --- | --- | --- |"]
    for cid, c in CASES.items():
        err = "(no error)" if c.error is None else f"`{c.error.__name__}`"
        lines.append(f"| `{cid}` | {c.area} | {c.what} | {err}: {c.fragment.replace('|', '&#124;')} |")
    return "\n".join(lines)


@pytest.mark.parametrize("cid", [pytest.param(k, marks=pytest.mark.triton) if v.needs_triton else k
                                 for k, v in CASES.items()])
def test_bad_input(cid, tmp_path):
    case = CASES[cid]
    if case.needs_triton and not HAS_TRITON:
        pytest.skip("Triton cannot run here")
    if cid == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the extension may load")
    if case.error is None:
        case.call(tmp_path)
        return
    with pytest.raises(case.error, match=re.escape(case.fragment)):
        case.call(tmp_path)


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- bad-inputs:start -->\n(.*?)\n<!-- bad-inputs:end -->", readme, re.S)
    assert match, "README.md lacks the bad-inputs table markers"
    assert match.group(1).strip() == render_table(), "README's bad-input table is stale: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    print(render_table())
