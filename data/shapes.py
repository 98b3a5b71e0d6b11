"""The shapes world: a synthetic, seeded, CPU-cheap image/text dataset (documented in docs/shapes.md).

Every image is drawn FROM a GenEval-format spec (one of the six GenEval tags, shape names as
classes), so its record carries the prompt it satisfies, a complete caption, ground-truth objects,
LLaVA-style conversations and MME-style yes/no pairs. Sample ``i`` of a split is rendered from an
RNG seeded by ``(seed, split, i)`` alone, so output never depends on worker count or order.

Pure API for other stages: :func:`render_scene` (arrays + record), :func:`scene_record` (the record
alone), :func:`render_sample` (a raw sample in the ``data.schema`` format), :func:`sample_geneval_spec`,
:func:`preset`. Writing shards / prompt files / the MME layout lives in ``data.shapes_cli``
(``python -m data.shapes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from data.schema import make_sample
from unimllm.config import ConfigError

# ----------------------------------------------------------------------------- vocabulary

# GenEval's ten colours; RGB values chosen far apart and far from the grey background (docs/shapes.md).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (35, 165, 65),
    "blue": (35, 80, 225),
    "purple": (140, 45, 200),
    "pink": (250, 145, 205),
    "brown": (125, 75, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPLITS = {"train": 0, "val": 1, "geneval": 2}  # disjoint SeedSequence streams per split
POSITION_THRESHOLD = 0.1  # GenEval's default position_threshold
MIN_BG_DISTANCE = 80.0  # RGB distance every object colour keeps from the background colour
TEXTURE_SPREAD = 2.0  # the background check allows texture offsets of +-2 texture_amplitude (2 sigma)
MME_SUFFIX = " Please answer yes or no."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- config


@dataclass
class ShapesConfig:
    """Difficulty of the shapes world. Sizes are fractions of the image side so presets scale."""

    image_size: int = 64
    "Image side in pixels (square images)."
    supersample: int = 4
    "Anti-aliasing: coverage is computed on a supersample x supersample sub-pixel grid."
    shapes: tuple[str, ...] = SHAPES
    "Shape classes (subset of circle, square, triangle); they are the GenEval class names."
    colors: tuple[str, ...] = ("red", "yellow", "green", "blue", "white", "black")
    "Object colours (subset of GenEval's ten; RGB in data.shapes.PALETTE)."
    max_objects: int = 3
    "Most objects in one image (counting prompts ask for 2..max_objects)."
    object_size: tuple[float, float] = (0.25, 0.4)
    "Range of an object's bounding-box side as a fraction of the image side."
    min_gap: float = 0.06
    "Smallest gap between two objects' bounding boxes (fraction of the side, > 0); objects never overlap."
    margin: float = 0.03
    "Smallest distance between an object and the image border (fraction of the side, >= 0)."
    background: Literal["plain", "textured"] = "plain"
    "Background kind: one flat colour, or that colour with smooth low-frequency texture and grain."
    background_color: tuple[int, int, int] = (128, 128, 128)
    "Background RGB; must stay far (MIN_BG_DISTANCE) from every object colour, jitter and texture included."
    background_jitter: int = 0
    "Per-image brightness offset of the background, uniform in [-jitter, +jitter]."
    texture_amplitude: float = 0.0
    "Textured background: standard deviation (0-255 scale) of the low-frequency texture."
    tag_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TAGS, 1.0))
    "Relative frequency of the six GenEval tags each image is drawn for."
    position_margin: float = 0.1
    "Position scenes/questions must satisfy GenEval's rule with threshold and cutoff raised by this (>= 0)."
    qa_turns: int = 8
    "Question-answer turns after the describe turn in each conversation (>= 0; a scene with fewer questions asks all)."
    shape_questions: bool = False
    """Conversations may also ask what shape an object of a given colour is ("What shape is the red object?"
    "Circle.") and a minimal yes/no pair that only the shape answers ("Is there a red circle?" Yes / "Is there
    a red square?" No). Most MME-style negatives change the colour, so a model that only sees colours answers
    most of them right (docs/results.md, session 6). Training conversations only: the record's ``mme`` pairs
    are unchanged. Off by default: at the demo's 1200 stage-2 steps it broke that colour shortcut before the
    model read shapes (held-out existence 54 vs 82)."""
    qa_pairs: Literal["both", "one"] = "both"
    """Which questions of each MME yes/no pair a conversation may ask: ``both``, or ``one`` drawn at random.
    With both, the second can be answered by negating the first ("Is the circle red? Yes" ... "Is the circle
    blue?"); ``one`` removes that, but did not train better understanding at 3400 stage-2 steps (held-out
    yes/no 0.61 vs 0.80, docs/results.md "Session 5"), so it is not the default. Record ``mme`` keeps both."""

    def validate(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ConfigError("image_size", f"must be in [16, 1024], got {self.image_size}")
        if not 1 <= self.supersample <= 8:
            raise ConfigError("supersample", "must be in [1, 8]")
        for key, values, known in (("shapes", self.shapes, SHAPES), ("colors", self.colors, tuple(PALETTE))):
            bad = [v for v in values if v not in known]
            if bad or not values or len(set(values)) != len(values):
                raise ConfigError(key, f"need distinct values from {known}, got {list(values)}")
        lo, hi = self.object_size
        if not 0.05 <= lo <= hi <= 0.6:
            raise ConfigError("object_size", f"need 0.05 <= min <= max <= 0.6, got {self.object_size}")
        if not 1 <= self.max_objects <= 8:
            raise ConfigError("max_objects", "must be in [1, 8]")
        if not self.min_gap > 0:  # touching squares would read as one rectangle: counts turn ambiguous
            raise ConfigError("min_gap", f"must be > 0 (objects never touch), got {self.min_gap}")
        if not 0 <= self.margin < 0.5:
            raise ConfigError("margin", f"must be in [0, 0.5) (objects stay inside the image), got {self.margin}")
        if self.position_margin < 0:
            raise ConfigError("position_margin", f"must be >= 0, got {self.position_margin}")
        if self.qa_turns < 0:
            raise ConfigError("qa_turns", f"must be >= 0, got {self.qa_turns}")
        usable = 1.0 - 2 * self.margin
        if hi > usable:
            raise ConfigError("object_size", f"max size {hi} does not fit inside the margins (1 - 2 * margin = {usable:g})")
        if math.ceil(math.sqrt(self.max_objects)) * (lo + self.min_gap) > usable:
            raise ConfigError("object_size", f"max_objects={self.max_objects} objects of size {lo} do not fit with "
                                             f"min_gap={self.min_gap} and margin={self.margin}")
        if any(not 0 <= c <= 255 for c in self.background_color):
            raise ConfigError("background_color", "channels must be in [0, 255]")
        if self.background_jitter < 0:
            raise ConfigError("background_jitter", f"must be >= 0, got {self.background_jitter}")
        if self.texture_amplitude < 0:
            raise ConfigError("texture_amplitude", f"must be >= 0, got {self.texture_amplitude}")
        # jitter and texture shift the background along the grey axis (the same offset on all channels)
        swing = self.background_jitter + (TEXTURE_SPREAD * self.texture_amplitude if self.background == "textured" else 0)
        for c in self.colors:
            d = background_distance(PALETTE[c], self.background_color, swing)
            if d < MIN_BG_DISTANCE:
                key = "background_color" if background_distance(PALETTE[c], self.background_color, 0) < MIN_BG_DISTANCE \
                    else "texture_amplitude" if self.background == "textured" and self.texture_amplitude else "background_jitter"
                raise ConfigError(key, f"the background (colour {self.background_color}, jitter {self.background_jitter}, "
                                       f"texture {self.texture_amplitude if self.background == 'textured' else 0}) comes "
                                       f"within {d:.0f} of object colour {c!r} (need >= {MIN_BG_DISTANCE:.0f})")
        bad_tags = [t for t in self.tag_weights if t not in TAGS]
        if bad_tags or any(w < 0 for w in self.tag_weights.values()) or sum(self.tag_weights.values()) <= 0:
            raise ConfigError("tag_weights", f"need non-negative weights over {TAGS} with a positive sum")
        two = self.max_objects >= 2
        needs = {"two_object": (len(self.shapes) >= 2 and two, "2 shapes and max_objects >= 2"),
                 "position": (len(self.shapes) >= 2 and two, "2 shapes and max_objects >= 2"),
                 "color_attr": (len(self.shapes) >= 2 and len(self.colors) >= 2 and two,
                                "2 shapes, 2 colors and max_objects >= 2"),
                 "counting": (two, "max_objects >= 2")}
        for tag, (ok, need) in needs.items():
            if self.tag_weights.get(tag, 0) > 0 and not ok:
                raise ConfigError("tag_weights", f"tag {tag!r} needs {need}; give it weight 0 or change these")
        # every scene must be placeable: the fallback layout of place_objects always works when this does
        rng = np.random.default_rng(0)
        _grid_layout(self, rng, self.max_objects)
        if self.tag_weights.get("position", 0) > 0:
            for rel in RELATIONS:
                _grid_layout(self, rng, 2, rel)


def background_distance(color, background, swing: float) -> float:
    """Smallest RGB distance between ``color`` and ``background + t * (1, 1, 1)`` for |t| <= ``swing``."""
    v = np.asarray(color, float) - np.asarray(background, float)
    t = float(np.clip(v.sum() / 3, -swing, swing))
    return float(np.linalg.norm(v - t))


def preset(level: str) -> ShapesConfig:
    """``demo``: big objects, 6 far-apart colours, 1-3 objects, plain grey. ``full``: 10 colours, 1-4, texture."""
    if level == "demo":
        return ShapesConfig()
    if level == "full":
        return ShapesConfig(colors=tuple(PALETTE), max_objects=4, object_size=(0.15, 0.32), min_gap=0.05,
                            background="textured", background_jitter=12, texture_amplitude=6.0)
    raise ConfigError("level", f"unknown level {level!r} (demo, full)")


# ----------------------------------------------------------------------------- geometry


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD, cutoff: float = 0.5) -> set[str]:
    """Relations of box A relative to box B under GenEval's rule (boxes ``(x0, y0, x1, y1)``, y down).

    Re-implemented from ``relative_position`` in djghosh13/geneval evaluation/evaluate_images.py
    (MIT): the centre offset is shrunk per axis by ``threshold * (dim_a + dim_b)``; a relation holds
    when the shrunk offset, divided by the full offset's length, passes ``cutoff`` on that axis.
    """
    a, b = np.asarray(box_a, float)[:4], np.asarray(box_b, float)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -cutoff:
        rels.add("left of")
    if dx > cutoff:
        rels.add("right of")
    if dy < -cutoff:
        rels.add("above")
    if dy > cutoff:
        rels.add("below")
    return rels


def robust_relations(box_a, box_b, margin: float) -> set[str]:
    """Relations that still hold with GenEval's threshold and cutoff both raised by ``margin``."""
    return relative_position(box_a, box_b, POSITION_THRESHOLD + margin, 0.5 + margin)


def coverage(shape: str, box, height: int, width: int, ss: int = 4) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage in [0, 1] of an ideal ``shape`` filling ``box`` (continuous pixel coords).

    Returns ``(window, alpha)``: ``alpha`` (float32, the window's shape) is the fraction of the
    ``ss x ss`` sub-pixel centres of each pixel inside the shape. Triangles are upright isosceles
    (apex at the top centre, base on the box bottom); circles are inscribed ellipses.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), width)
    r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), height)
    window = (slice(r0, r1), slice(c0, c1))
    if c1 <= c0 or r1 <= r0:
        return window, np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), np.float32)
    u = c0 + (np.arange((c1 - c0) * ss) + 0.5) / ss  # sub-pixel centres, x
    v = r0 + (np.arange((r1 - r0) * ss) + 0.5) / ss  # sub-pixel centres, y
    uu, vv = u[None, :], v[:, None]
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    if shape == "circle":
        inside = ((uu - cx) / hw) ** 2 + ((vv - cy) / hh) ** 2 <= 1.0
    elif shape == "square":
        inside = (np.abs(uu - cx) <= hw) & (np.abs(vv - cy) <= hh)
    elif shape == "triangle":
        t = (vv - y0) / (y1 - y0 + 1e-6)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(uu - cx) <= t * hw)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    alpha = inside.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3), dtype=np.float32)
    return window, alpha


PATCH_SHAPES = ("background", *SHAPES)
"""Class names of :func:`patch_labels`' ``shape`` (index 0 = no object)."""
PATCH_COLORS = ("background", *PALETTE)
"""Class names of :func:`patch_labels`' ``color`` (index 0 = no object)."""


def patch_labels(objects: list[dict], image_size: int, grid: int, min_cover: float = 0.2,
                 ss: int = 2) -> dict[str, np.ndarray]:
    """Per-cell ground truth of a ``grid x grid`` partition of an ``image_size`` image, from a record's
    ``objects``: each cell belongs to the object covering most of it, if that object covers at least
    ``min_cover`` of the cell, else to the background. Returns ``shape`` (g, g) int64 (index into
    PATCH_SHAPES), ``color`` (g, g) int64 (index into PATCH_COLORS), ``center`` (g, g, 2) float32 (the owner's
    centre x, y as a fraction of the side; 0.5 for background cells) and ``cover`` (g, g) float32 (the
    owner's coverage of the cell). What a semantic teacher of the shapes world is trained to see."""
    if image_size % grid:
        raise ValueError(f"image size {image_size} is not a multiple of the grid {grid}")
    c = image_size // grid
    covers = np.zeros((len(objects) + 1, grid, grid), np.float32)  # row 0: background
    covers[0] = min_cover
    for i, obj in enumerate(objects):
        full = np.zeros((image_size, image_size), np.float32)
        window, alpha = coverage(obj["shape"], obj["bbox"], image_size, image_size, ss)
        full[window] = alpha
        covers[i + 1] = full.reshape(grid, c, grid, c).mean(axis=(1, 3))  # (g, g)
    owner = covers.argmax(0)  # (g, g): 0 = background
    shape = np.zeros((grid, grid), np.int64)
    color = np.zeros((grid, grid), np.int64)
    center = np.full((grid, grid, 2), 0.5, np.float32)
    for i, obj in enumerate(objects):
        cells = owner == i + 1
        shape[cells] = PATCH_SHAPES.index(obj["shape"])
        color[cells] = PATCH_COLORS.index(obj["color"])
        center[cells] = np.asarray(obj["center"], np.float32) / image_size
    return {"shape": shape, "color": color, "center": center,
            "cover": np.take_along_axis(covers, owner[None], 0)[0] * (owner > 0)}


# ----------------------------------------------------------------------------- GenEval specs


def sample_geneval_spec(cfg: ShapesConfig, rng: np.random.Generator, tag: str | None = None) -> tuple[dict, list]:
    """A GenEval-format metadata dict and the ``[shape, colour]`` list of the objects it implies.

    Templates, clause keys and key order mirror prompts/evaluation_metadata.jsonl of GenEval; the
    relation of a position prompt is carried by the second include clause (``[rel, 0]``).
    """
    if tag is None:
        tags = [t for t in TAGS if cfg.tag_weights.get(t, 0) > 0]
        w = np.array([cfg.tag_weights[t] for t in tags], float)
        tag = tags[rng.choice(len(tags), p=w / w.sum())]
    shapes, colors = list(cfg.shapes), list(cfg.colors)

    def pick(seq, k=1):
        return [seq[j] for j in rng.choice(len(seq), size=k, replace=False)]

    def color():
        return colors[rng.integers(len(colors))]

    meta: dict[str, Any] = {"tag": tag}
    if tag == "single_object":
        (a,) = pick(shapes)
        meta["include"] = [{"class": a, "count": 1}]
        prompt, objs = f"a photo of {article(a)} {a}", [[a, color()]]
    elif tag == "two_object":
        a, b = pick(shapes, 2)
        meta["include"] = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        prompt, objs = f"a photo of {article(a)} {a} and {article(b)} {b}", [[a, color()], [b, color()]]
    elif tag == "counting":
        (a,) = pick(shapes)
        n = int(rng.integers(2, cfg.max_objects + 1))
        meta["include"] = [{"class": a, "count": n}]
        meta["exclude"] = [{"class": a, "count": n + 1}]
        prompt, objs = f"a photo of {NUMBERS[n]} {PLURALS[a]}", [[a, color()] for _ in range(n)]
    elif tag == "colors":
        (a,), c = pick(shapes), color()
        meta["include"] = [{"class": a, "count": 1, "color": c}]
        prompt, objs = f"a photo of {article(c)} {c} {a}", [[a, c]]
    elif tag == "position":
        a, b = pick(shapes, 2)
        rel = RELATIONS[rng.integers(4)]
        meta["include"] = [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}]
        prompt, objs = f"a photo of {article(b)} {b} {rel} {article(a)} {a}", [[a, color()], [b, color()]]
    elif tag == "color_attr":
        a, b = pick(shapes, 2)
        ca, cb = pick(colors, 2)
        meta["include"] = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        prompt, objs = f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}", [[a, ca], [b, cb]]
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}")
    meta["prompt"] = prompt
    return meta, objs


# ----------------------------------------------------------------------------- text


def location(obj: dict, side: int) -> str:
    """Coarse 3x3-grid location phrase of an object's centre ("at the top left", "in the center")."""
    col, row = (min(int(v / side * 3), 2) for v in obj["center"])
    r, c = ("top", "middle", "bottom")[row], ("left", "center", "right")[col]
    if (row, col) == (1, 1):
        return "in the center"
    if row == 1:
        return f"on the {c}"
    return f"at the {r}" if col == 1 else f"at the {r} {c}"


def describe(objects: list[dict], i: int) -> str | None:
    """A unique referring phrase for object ``i`` ("the circle", "the red circle"), or None."""
    o = objects[i]
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        return f"the {o['shape']}"
    if sum((p["shape"], p["color"]) == (o["shape"], o["color"]) for p in objects) == 1:
        return f"the {o['color']} {o['shape']}"
    return None


def _rel_phrase(rel: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)


def _count_phrase(shape: str, k: int) -> str:
    return f"{article(shape)} {shape}" if k == 1 else f"{NUMBERS[k]} {PLURALS[shape]}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption(cfg: ShapesConfig, objects: list[dict]) -> str:
    """Complete description: object count, per-class counts, every object's colour/shape/location.

    Two-object scenes add their robust GenEval relation ("The red circle is left of the square.").
    """
    order = sorted(range(len(objects)), key=lambda i: (objects[i]["center"][1] // (cfg.image_size / 3),
                                                         objects[i]["center"][0]))
    items = [f"{article(objects[i]['color'])} {objects[i]['color']} {objects[i]['shape']} "
             f"{location(objects[i], cfg.image_size)}" for i in order]
    n = len(objects)
    if n == 1:
        return f"One object: {items[0]}."
    counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    summary = _join([_count_phrase(s, k) for s, k in counts.items() if k])
    text = f"{_cap(NUMBERS[n])} objects: {summary}. {_cap(_join(items))}."
    d0, d1 = (describe(objects, 0), describe(objects, 1)) if n == 2 else (None, None)
    if d0 and d1:
        rels = robust_relations(objects[0]["bbox"], objects[1]["bbox"], cfg.position_margin)
        if rels:
            text += f" {_cap(d0)} is {' and '.join(sorted(rels))} {d1}."
    return text


def _pair(yes: str, no: str) -> list[dict]:
    return [{"question": yes + MME_SUFFIX, "answer": "Yes"}, {"question": no + MME_SUFFIX, "answer": "No"}]


def mme_pairs(cfg: ShapesConfig, objects: list[dict], rng: np.random.Generator) -> dict[str, list[dict]]:
    """MME-style yes/no pairs per subtask (existence, count, position, color); a subtask is left out
    when no unambiguous pair exists (colour needs a uniquely named object, position a robust relation)."""
    out: dict[str, list[dict]] = {}
    present = {(o["color"], o["shape"]) for o in objects}
    # existence: a present (colour, shape) vs an absent one, preferring near misses
    absent = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    if absent:
        yc, ys = sorted(present)[rng.integers(len(present))]
        pool = near or absent
        nc, ns = pool[rng.integers(len(pool))]
        out["existence"] = _pair(f"Is there {article(yc)} {yc} {ys} in the image?",
                                 f"Is there {article(nc)} {nc} {ns} in the image?")
    # count: the true count of a present class vs one off
    shapes = sorted({o["shape"] for o in objects})
    s = shapes[rng.integers(len(shapes))]
    k = sum(o["shape"] == s for o in objects)
    wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1

    def count_q(j: int) -> str:
        return f"Is there exactly one {s} in the image?" if j == 1 else \
            f"Are there exactly {NUMBERS[j]} {PLURALS[s]} in the image?"

    out["count"] = _pair(count_q(k), count_q(wrong))
    # position: an ordered pair of uniquely named objects with a robust relation, vs its opposite
    cands = [(i, j, sorted(robust_relations(objects[i]["bbox"], objects[j]["bbox"], cfg.position_margin)))
             for i in range(len(objects)) for j in range(len(objects))
             if i != j and describe(objects, i) and describe(objects, j)]
    cands = [c for c in cands if c[2]]
    if cands:
        i, j, rels = cands[rng.integers(len(cands))]
        rel = rels[rng.integers(len(rels))]
        di, dj = describe(objects, i), describe(objects, j)
        out["position"] = _pair(f"Is {di} {_rel_phrase(rel)} {dj}?", f"Is {di} {_rel_phrase(OPPOSITE[rel])} {dj}?")
    # color: an object whose shape is unique in the image, its colour vs another (preferably present) one
    unique = [i for i in range(len(objects)) if sum(o["shape"] == objects[i]["shape"] for o in objects) == 1]
    if unique and len(cfg.colors) > 1:
        o = objects[unique[rng.integers(len(unique))]]
        others = [c for c in cfg.colors if c != o["color"]]
        hard = [c for c in others if any(p["color"] == c for p in objects)]
        pool = hard if hard and rng.random() < 0.5 else others
        out["color"] = _pair(f"Is the {o['shape']} {o['color']}?", f"Is the {o['shape']} {pool[rng.integers(len(pool))]}?")
    return out


def asked(cfg: ShapesConfig, pair: list, rng: np.random.Generator) -> list:
    """The questions of a yes/no pair a conversation asks: both, or one drawn at random (``qa_pairs``)."""
    return pair if cfg.qa_pairs == "both" else [pair[rng.integers(len(pair))]]


def shape_questions(cfg: ShapesConfig, objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs only the shapes answer: "What shape is the <colour> object?" for every colour
    that one object has, and an existence pair about one object, its shape vs a shape no object of that
    colour has (asked both, or one of them with ``qa_pairs: one``)."""
    out = []
    for o in objects:
        if sum(p["color"] == o["color"] for p in objects) == 1:
            out.append((f"What shape is the {o['color']} object?", f"{o['shape'].capitalize()}."))
    present = {(o["color"], o["shape"]) for o in objects}
    cands = [(o, s) for o in objects for s in cfg.shapes if (o["color"], s) not in present]
    if cands:
        o, s = cands[rng.integers(len(cands))]
        c = o["color"]
        pair = [(f"Is there {article(c)} {c} {o['shape']} in the image?{MME_SUFFIX}", "Yes"),
                (f"Is there {article(c)} {c} {s} in the image?{MME_SUFFIX}", "No")]
        out += asked(cfg, pair, rng)
    return out


def conversations(cfg: ShapesConfig, objects: list[dict], text: str, mme: dict, rng: np.random.Generator) -> list[dict]:
    """LLaVA turns: describe (answered by the caption), then ``qa_turns`` questions from a pool of
    open count/colour questions, the record's MME yes/no questions (one or both of each pair, ``qa_pairs``)
    and, with ``shape_questions``, the questions only the shapes answer (:func:`shape_questions`)."""
    pool = []
    for s in sorted({o["shape"] for o in objects}):
        k = sum(o["shape"] == s for o in objects)
        pool.append((f"How many {PLURALS[s]} are there?", f"{NUMBERS[k].capitalize()}."))
    for i, o in enumerate(objects):
        if describe(objects, i) == f"the {o['shape']}":
            pool.append((f"What color is the {o['shape']}?", f"{o['color'].capitalize()}."))
    for pair in mme.values():
        pool += [(q["question"], q["answer"]) for q in asked(cfg, pair, rng)]
    if cfg.shape_questions:  # none that is one of the MME pairs (asked above, or left out with qa_pairs: one)
        mme_questions = {q["question"] for pair in mme.values() for q in pair}
        pool += [qa for qa in shape_questions(cfg, objects, rng) if qa[0] not in mme_questions]
    turns = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": text}]
    for j in rng.permutation(len(pool))[: cfg.qa_turns]:
        turns += [{"from": "human", "value": pool[j][0]}, {"from": "gpt", "value": pool[j][1]}]
    return turns


# ----------------------------------------------------------------------------- scenes


def _separated(box, others, gap: float) -> bool:
    for o in others:
        if not (box[0] >= o[2] + gap or o[0] >= box[2] + gap or box[1] >= o[3] + gap or o[1] >= box[3] + gap):
            return False
    return True


def _grid_layout(cfg: ShapesConfig, rng: np.random.Generator, n: int, relation: str | None = None) -> list[list[float]]:
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
    if that fails too (a tight config), a jittered grid of minimum-size boxes is used (:func:`_grid_layout`;
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
    return _grid_layout(cfg, rng, n, relation)


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
