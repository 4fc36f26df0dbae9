"""GAP-MLLM's pre-training task, visual-prompted and joint: numbered markers are drawn on the frames the model sees,
and the answer gives, per marker, the semantic label and the 3D point in metres in the camera coordinates of the
clip's first frame (back-projected depth, carried through the poses). It forces the model to read geometry.

Per sample: ``frames`` frames of a scene (evenly spread over a random window; the first is the anchor), and
``prompts`` prompt pixels, each on a random one of those frames, on a random instance visible there (then a random
pixel of it, so that objects are not drowned by walls and floor), where the depth is valid and smooth (the 3 x 3
neighbourhood within 5 cm: never on a hole or a depth edge) and the pixel is labelled. Records are LLaVA-style
(``images`` + ``conversations``) for GeoAlignSFTDataset; ``metadata.prompts`` keeps, per prompt, ``frame`` (index
into ``images``), ``u``, ``v`` (colour pixel), ``label`` and ``xyz`` (metres, first-frame camera), so that any
record can be checked. Our choices where the paper is silent: marker style, answer format (2 decimals, cm), the
prompt wording, and sampling prompts on any labelled surface (walls and floor included).
"""
from __future__ import annotations

import io
import os
import zlib

import numpy as np

from .scenes import PosedScene, backproject, to_first_camera

QUESTION = ("The frames show numbered markers. For each marker, give the category of what it marks and its 3D "
            "position (x, y, z) in metres, in the camera coordinates of the first frame (x right, y down, z forward).")
MARKER_RADIUS = 6
SMOOTH_DEPTH_M = 0.05


def colour_to_depth_pixel(scene: PosedScene, u: float, v: float) -> tuple[int, int]:
    """The depth-image pixel seen through colour pixel (u, v) (ScanNet registers both to one camera centre)."""
    x = (u - scene.K_color[0, 2]) / scene.K_color[0, 0]
    y = (v - scene.K_color[1, 2]) / scene.K_color[1, 1]
    return int(round(x * scene.K_depth[0, 0] + scene.K_depth[0, 2])), int(round(y * scene.K_depth[1, 1]
                                                                                + scene.K_depth[1, 2]))


def depth_to_colour_pixel(scene: PosedScene, ud: int, vd: int) -> tuple[float, float]:
    x = (ud - scene.K_depth[0, 2]) / scene.K_depth[0, 0]
    y = (vd - scene.K_depth[1, 2]) / scene.K_depth[1, 1]
    return x * scene.K_color[0, 0] + scene.K_color[0, 2], y * scene.K_color[1, 1] + scene.K_color[1, 2]


def promptable(depth: np.ndarray, labels: np.ndarray, border: int) -> np.ndarray:
    """bool [H, W]: valid, smooth depth (3 x 3 within SMOOTH_DEPTH_M), a label, at least ``border`` px inside."""
    H, W = depth.shape
    ok = (depth > 0) & (labels > 0)
    pad = np.pad(depth, 1, mode="edge")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            n = pad[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
            ok &= (n > 0) & (np.abs(n - depth) <= SMOOTH_DEPTH_M)
    ok[:border], ok[H - border:], ok[:, :border], ok[:, W - border:] = False, False, False, False
    return ok


def marker_layout(u: float, v: float, n: int, width: int, height: int, font=None) -> dict:
    """Where :func:`draw_markers` puts marker ``n`` of point (u, v) in a ``width`` x ``height`` frame, all inside
    the frame: the disc stays centred on the point (its radius shrinks below MARKER_RADIUS only for a point nearer
    the edge than that, down to 2 px); the number goes beside the disc, upper right as usual, else the first of upper
    left, lower right, lower left that fits (so it moves inward at the right and top edges), else beside the disc
    shifted vertically into the frame, else (a frame too narrow for either side) clamped inside. Returns
    {"radius", "disc": (x0, y0, x1, y1), "text_xy": where to draw the text, "text_box": its pixel box (x0, y0, x1,
    y1), right and bottom exclusive}. ``font``: a PIL font (default: PIL's default font)."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = font or measure.getfont()
    edge = min(u, width - 1 - u, v, height - 1 - v)
    r = int(max(2, min(MARKER_RADIUS, int(edge))))
    l, t, rr, b = measure.textbbox((0, 0), str(n), font=font, stroke_width=1)
    w, h = rr - l, b - t
    gap_x, gap_y = 1 + l, 2 - t               # upper right is where the text always went: drawn at (u+r+1, v-r-2)
    lefts = {"right": u + r + gap_x, "left": u - r - gap_x - w}
    tops = {"upper": v - r - gap_y, "lower": v + r + gap_y - h, "inside": min(max(v - h / 2, 0), height - h)}
    box = None
    for vert, horiz in (("upper", "right"), ("upper", "left"), ("lower", "right"), ("lower", "left"),
                        ("inside", "right"), ("inside", "left")):
        x0, y0 = lefts[horiz], tops[vert]
        if x0 >= 0 and y0 >= 0 and x0 + w <= width and y0 + h <= height:
            box = (x0, y0)
            break
    if box is None:                                  # a frame too small for any side: clamp inside
        box = (min(max(lefts["right"], 0), max(width - w, 0)), min(max(tops["upper"], 0), max(height - h, 0)))
    x0, y0 = int(round(box[0])), int(round(box[1]))
    x0, y0 = min(max(x0, 0), max(width - w, 0)), min(max(y0, 0), max(height - h, 0))
    return {"radius": r, "disc": (u - r, v - r, u + r, v + r), "text_xy": (x0 - l, y0 - t),
            "text_box": (x0, y0, x0 + w, y0 + h)}


def draw_markers(image: np.ndarray, marks: list[tuple[float, float, int]]) -> np.ndarray:
    """A copy of ``image`` [H, W, 3] uint8 with a numbered marker (white disc, black ring, yellow number with a
    black outline) per (u, v, n), disc and number kept whole inside the frame (see :func:`marker_layout`)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    font = draw.getfont()
    H, W = image.shape[:2]
    for u, v, n in marks:
        lay = marker_layout(u, v, n, W, H, font)
        draw.ellipse(lay["disc"], fill=(255, 255, 255), outline=(0, 0, 0), width=2 if lay["radius"] >= 4 else 1)
        draw.text(lay["text_xy"], str(n), font=font, fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(im)


def answer_text(prompts: list[dict]) -> str:
    """'1: chair (0.52, -0.10, 2.31)' per prompt, in marker order."""
    return "\n".join(f"{i + 1}: {p['label']} ({p['xyz'][0]:.2f}, {p['xyz'][1]:.2f}, {p['xyz'][2]:.2f})"
                     for i, p in enumerate(prompts))


def make_pretrain_records(scene: PosedScene, media_dir: str, media_root: str, *, samples: int = 1, frames: int = 4,
                          prompts: int = 4, seed: int = 0) -> list[dict]:
    """``samples`` records for ``scene``; marked frames are written under ``media_dir`` (paths in the records are
    relative to ``media_root``). Raises ValueError if the scene has too few frames or promptable pixels."""
    from ..atomic_files import write_bytes

    if frames < 1 or prompts < 1 or samples < 1:
        raise ValueError(f"frames, prompts and samples must be >= 1, got {frames}, {prompts}, {samples}")
    if len(scene) < frames:
        raise ValueError(f"scene {scene.root!r} has {len(scene)} frames, fewer than frames={frames}")
    rng = np.random.default_rng([seed, zlib.crc32(scene.name.encode())])      # stable across processes
    records = []
    for s in range(samples):
        window = int(rng.integers(frames, len(scene) + 1))
        start = int(rng.integers(0, len(scene) - window + 1))
        chosen = [start + int(round(x)) for x in np.linspace(0, window - 1, frames)]
        colours = [scene.color(i) for i in chosen]
        candidates = []
        for k, i in enumerate(chosen):
            depth, labels = scene.depth(i), scene.labels(i)
            ok = promptable(depth, labels, border=MARKER_RADIUS + 2)
            vd, ud = np.nonzero(ok)
            candidates.append((depth, labels, scene.instances(i), vd, ud))
        if sum(len(c[3]) for c in candidates) < prompts:
            raise ValueError(f"scene {scene.root!r}: too few pixels with valid depth and a label for {prompts} "
                             "prompts")
        picked: list[dict] = []
        marks: list[list[tuple[float, float, int]]] = [[] for _ in chosen]
        tries = 0
        while len(picked) < prompts:
            tries += 1
            if tries > 1000 * prompts:
                raise ValueError(f"scene {scene.root!r}: could not place {prompts} separated prompts")
            k = int(rng.integers(0, len(chosen)))
            depth, labels, instances, vd, ud = candidates[k]
            if not len(vd):
                continue
            present = np.unique(instances[vd, ud])                  # an instance first, then one of its pixels:
            inst = present[int(rng.integers(0, len(present)))]     # objects are not drowned by walls and floor
            among = np.flatnonzero(instances[vd, ud] == inst)
            j = int(among[int(rng.integers(0, len(among)))])
            ud_j, vd_j = int(ud[j]), int(vd[j])
            u, v = depth_to_colour_pixel(scene, ud_j, vd_j)
            if any((u - a) ** 2 + (v - b) ** 2 < (3 * MARKER_RADIUS) ** 2 for a, b, _ in marks[k]):
                continue                                            # markers must not overlap
            p_cam = backproject(scene.K_depth, ud_j, vd_j, depth[vd_j, ud_j])
            xyz = to_first_camera(scene, chosen[k], p_cam, anchor=chosen[0])
            marks[k].append((u, v, len(picked) + 1))
            picked.append({"frame": k, "u": round(float(u), 3), "v": round(float(v), 3),
                           "label": scene.label_name(labels[vd_j, ud_j]), "instance": int(instances[vd_j, ud_j]),
                           "xyz": [round(float(c), 4) for c in xyz]})
        images = []
        for k, i in enumerate(chosen):
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(draw_markers(colours[k], marks[k])).save(buf, format="JPEG", quality=92)
            path = os.path.join(media_dir, f"{scene.name}_{seed}_{s}_{k}.jpg")
            write_bytes(path, buf.getvalue())
            images.append(os.path.relpath(path, media_root))
        records.append({"id": f"{scene.name}/{seed}/{s}", "images": images,
                        "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                          {"from": "gpt", "value": answer_text(picked)}],
                        "metadata": {"task": "gap_pretrain", "scene": scene.name,
                                     "frame_ids": [scene.frame_ids[i] for i in chosen], "prompts": picked}})
    return records
