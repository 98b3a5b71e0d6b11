"""Geometry of the shapes world: GenEval's relative-position rule, anti-aliased shape coverage, and the per-cell
labels (:func:`patch_labels`) a semantic teacher is trained on."""

from __future__ import annotations

import math

import numpy as np

from data.shapes_config import PALETTE, POSITION_THRESHOLD, SHAPES

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
