"""The shapes world: a synthetic, seeded, CPU-cheap image/text dataset (documented in docs/shapes.md).

Every image is drawn FROM a GenEval-format spec (one of the six GenEval tags, shape names as
classes), so its record carries the prompt it satisfies, a complete caption, ground-truth objects,
LLaVA-style conversations and MME-style yes/no pairs. Sample ``i`` of a split is rendered from an
RNG seeded by ``(seed, split, i)`` alone, so output never depends on worker count or order.

This module places and renders scenes: :func:`render_scene` (arrays + record), :func:`scene_record` (the record
alone), :func:`render_sample` (a raw sample in the ``data.schema`` format). The rest of the world:
``data.shapes_config`` (vocabulary, :class:`ShapesConfig`, ``preset``), ``data.shapes_geometry`` (GenEval's
position rule, coverage, per-cell labels), ``data.shapes_text`` (GenEval specs, captions, questions,
conversations). Writing shards / prompt files / the MME layout lives in ``data.shapes_cli``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data.schema import make_sample
from data.shapes_config import PALETTE, SPLITS, ShapesConfig
from data.shapes_geometry import coverage, robust_relations
from data.shapes_text import caption, conversations, mme_pairs, sample_geneval_spec
from unimllm.config import ConfigError

# ----------------------------------------------------------------------------- scenes


def _separated(box, others, gap: float) -> bool:
    for o in others:
        if not (box[0] >= o[2] + gap or o[0] >= box[2] + gap or box[1] >= o[3] + gap or o[1] >= box[3] + gap):
            return False
    return True


def grid_layout(cfg: ShapesConfig, rng: np.random.Generator, n: int, relation: str | None = None) -> list[list[float]]:
    """The fallback of :func:`place_objects`: ``n`` boxes of the minimum size, one per cell of a
    ceil(sqrt(n))-wide grid (random cells, jittered inside them); with ``relation``, the two boxes sit at
    the two ends of the relation's axis. Raises ConfigError naming the fields when even this fails."""
    side = float(cfg.image_size)
    s = cfg.object_size[0] * side
    margin, gap = cfg.margin * side, cfg.min_gap * side
    usable = side - 2 * margin
    if relation:
        near, far = margin, side - margin - s  # box 1 at `near` is left of / above box 0 at `far`
        b0, b1 = (far, near) if relation in ("left of", "above") else (near, far)
        other = margin + rng.random() * (usable - s)
        if relation in ("left of", "right of"):
            boxes = [[b0, other, b0 + s, other + s], [b1, other, b1 + s, other + s]]
        else:
            boxes = [[other, b0, other + s, b0 + s], [other, b1, other + s, b1 + s]]
        if relation not in robust_relations(boxes[1], boxes[0], cfg.position_margin) or not _separated(
                boxes[1], boxes[:1], gap):
            raise ConfigError("position_margin", f"a position scene cannot place two objects of object_size "
                                                 f"{cfg.object_size[0]} robustly {relation!r} each other with "
                                                 f"position_margin={cfg.position_margin}, margin={cfg.margin}, "
                                                 f"min_gap={cfg.min_gap}")
        return boxes
    k = math.ceil(math.sqrt(n))
    cell = usable / k
    if cell - s - gap < 0:
        raise ConfigError("object_size", f"could not place {n} objects of size {cfg.object_size[0]}; lower "
                                         "object_size / min_gap / margin / max_objects")
    boxes = []
    for c in rng.permutation(k * k)[:n]:
        row, col = divmod(int(c), k)
        x0 = margin + col * cell + gap / 2 + rng.random() * (cell - s - gap)
        y0 = margin + row * cell + gap / 2 + rng.random() * (cell - s - gap)
        boxes.append([x0, y0, x0 + s, y0 + s])
    return boxes


def place_objects(cfg: ShapesConfig, rng: np.random.Generator, n: int, relation: str | None = None) -> list[list[float]]:
    """``n`` non-overlapping boxes (pixels); with ``relation``, box 1 is robustly ``relation`` of box 0.

    Rejection sampling; after repeated failures the sampled sizes shrink towards the minimum size, and
    if that fails too (a tight config), a jittered grid of minimum-size boxes is used (:func:`grid_layout`;
    ``ShapesConfig.validate`` checks that it works, so a validated config always places its objects).
    """
    side = float(cfg.image_size)
    lo, hi = cfg.object_size
    margin, gap = cfg.margin * side, cfg.min_gap * side
    for attempt in range(40):
        shrink = 0.9**attempt
        sizes = [max(lo, lo + (hi - lo) * rng.random() * shrink) * side for _ in range(n)]
        boxes: list[list[float]] = []
        for s in sizes:
            for _ in range(100):
                x0 = margin + rng.random() * (side - 2 * margin - s)
                y0 = margin + rng.random() * (side - 2 * margin - s)
                box = [x0, y0, x0 + s, y0 + s]
                if not _separated(box, boxes, gap):
                    continue
                if relation and len(boxes) == 1 and relation not in robust_relations(box, boxes[0], cfg.position_margin):
                    continue
                boxes.append(box)
                break
            else:
                break
        if len(boxes) == n:
            return boxes
    return grid_layout(cfg, rng, n, relation)


def render_background(cfg: ShapesConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 background: flat colour + per-image jitter (+ smooth texture and grain)."""
    n = cfg.image_size
    bg = np.array(cfg.background_color, np.float32)
    if cfg.background_jitter:
        bg = bg + rng.integers(-cfg.background_jitter, cfg.background_jitter + 1)
    out = np.broadcast_to(bg, (n, n, 3)).astype(np.float32)
    if cfg.background == "textured" and cfg.texture_amplitude > 0:
        coarse = rng.normal(0, 1, (6, 6)).astype(np.float32)  # low-frequency luminance field
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.BICUBIC))
        grain = rng.normal(0, 0.35, (n, n)).astype(np.float32)
        out = out + (cfg.texture_amplitude * (smooth + grain))[..., None]
    return out


def render_image(cfg: ShapesConfig, objects: list[dict], background: np.ndarray) -> np.ndarray:
    """Composite anti-aliased flat-colour objects over ``background``; returns uint8 (H, W, 3)."""
    img = background.copy()
    n = cfg.image_size
    for obj in objects:
        (rows, cols), alpha = coverage(obj["shape"], obj["bbox"], n, n, cfg.supersample)
        color = np.array(PALETTE[obj["color"]], np.float32)
        a = alpha[..., None]
        img[rows, cols] = img[rows, cols] * (1 - a) + color * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class Scene:
    """One rendered sample: ``image`` uint8 (H, W, 3) and its ``record`` (the sample json)."""

    key: str
    image: np.ndarray
    record: dict


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of sample ``index`` of ``split``: a function of (seed, split, index) only."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _scene(cfg: ShapesConfig, split: str, index: int, seed: int) -> tuple[dict, np.random.Generator]:
    """The record of a scene and the RNG its image is painted with."""
    # independent child streams, so e.g. the texture's draws (which depend on the image size) do
    # not shift the questions
    layout_rng, paint_rng, text_rng = scene_rng(seed, split, index).spawn(3)
    meta, specs = sample_geneval_spec(cfg, layout_rng)
    relation = meta["include"][1]["position"][0] if meta["tag"] == "position" else None
    boxes = place_objects(cfg, layout_rng, len(specs), relation)
    # The text is computed from the exact boxes, which scale exactly with image_size (a power-of-two
    # size ratio is exact in floating point), so 64 px and 256 px get the same questions; the boxes are
    # rounded (0.01 px) only for the record, and the image is drawn from the record's boxes.
    exact = [{"shape": shape, "color": color, "bbox": box, "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]}
             for (shape, color), box in zip(specs, boxes)]
    text = caption(cfg, exact)
    mme = mme_pairs(cfg, exact, text_rng)
    record = {
        "caption": text,
        "prompt": meta["prompt"],
        "geneval": meta,
        "objects": [_rounded(o) for o in exact],
        "mme": mme,
        "split": split,
        "index": index,
        "conversations": conversations(cfg, exact, text, mme, text_rng),
    }
    return record, paint_rng


def _rounded(obj: dict) -> dict:
    box = [round(v, 2) for v in obj["bbox"]]
    return {**obj, "bbox": box, "center": [round((box[0] + box[2]) / 2, 2), round((box[1] + box[3]) / 2, 2)]}


def scene_record(cfg: ShapesConfig, split: str, index: int, seed: int = 0) -> dict:
    """The record (sample json) of :func:`render_scene` without rendering the image."""
    return _scene(cfg, split, index, seed)[0]


def render_scene(cfg: ShapesConfig, split: str, index: int, seed: int = 0) -> Scene:
    """Sample a GenEval spec, place and render its objects, and write the full record."""
    record, paint_rng = _scene(cfg, split, index, seed)
    image = render_image(cfg, record["objects"], render_background(cfg, paint_rng))
    return Scene(f"shapes-{split}-{index:08d}", image, record)


def render_sample(cfg: ShapesConfig, split: str, index: int, seed: int = 0) -> dict[str, Any]:
    """:func:`render_scene` as a raw ``data.schema`` sample (``__key__``, ``png``, ``json``)."""
    scene = render_scene(cfg, split, index, seed)
    return make_sample(scene.key, Image.fromarray(scene.image), scene.record, ext="png")


if __name__ == "__main__":
    from data.shapes_cli import main

    main()
