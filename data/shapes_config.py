"""The shapes world's vocabulary (shapes, GenEval's colours, relations, numbers) and its config (:class:`ShapesConfig`,
presets). The world itself: :mod:`data.shapes`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

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
    "Object colours (subset of GenEval's ten; RGB in data.shapes_config.PALETTE)."
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
        from data.shapes import grid_layout  # scene layout lives with the scenes

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
        grid_layout(self, rng, self.max_objects)
        if self.tag_weights.get("position", 0) > 0:
            for rel in RELATIONS:
                grid_layout(self, rng, 2, rel)


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
