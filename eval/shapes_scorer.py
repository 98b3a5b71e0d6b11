"""Programmatic GenEval scorer for shapes-world images (documented in docs/shapes.md).

GenEval scores a generated image by detecting objects (Mask2Former), classifying each detected
object's colour (CLIP) and applying rules to the prompt's metadata. Here the detector is classical
and exact on clean renders, and built to survive blur (a tokenizer's reconstructions, a small
generator's samples):

1. background colour = median of the image border;
2. every pixel is explained as a mix ``bg + a * (colour - bg)`` of the background and each of the
   ten GenEval colours; it takes the colour whose mixing line fits it best, and is an object
   pixel when that colour's ``a >= alpha_threshold`` (so a blurred edge is cut where it is half
   object, and a blurred red/grey edge is never mistaken for pink or brown);
3. connected components per colour (scipy.ndimage), tiny and sliver-shaped ones dropped;
4. shape class = the ideal circle / square / triangle which, sized from the component's coverage
   moments and blurred like the image (one sigma per image, chosen from ``blur_sigmas``), has the
   highest soft IoU with the component's coverage; that IoU is the detection's confidence, and
   components fitting no shape well are dropped, like low-confidence detections.

:func:`evaluate` then applies GenEval's ``evaluate`` rules to the detections; :func:`score` is
``detect`` + ``evaluate``. ``method="fill"`` swaps step 4 for the naive fill-ratio classifier
(area / bbox area thresholds), kept as the baseline of benchmarks/shapes_scorer.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from data.shapes_config import PALETTE, POSITION_THRESHOLD, SHAPES
from data.shapes_geometry import coverage, relative_position
from unimllm.config import ConfigError

COLORS = tuple(PALETTE)  # GenEval's colour order


@dataclass
class ScorerConfig:
    """Detector knobs; sizes are fractions of the image so one config serves 64 px and 256 px."""

    colors: tuple[str, ...] = COLORS
    "Colours the detector can assign (GenEval's ten by default; RGB from data.shapes_config.PALETTE)."
    shapes: tuple[str, ...] = SHAPES
    "Shape classes the detector fits."
    alpha_threshold: float = 0.5
    "A pixel is object colour c when it lies at least this fraction of the way from background to c."
    min_area: float = 0.004
    "Components smaller than this fraction of the image area are dropped (noise, blur fringes)."
    max_aspect: float = 2.0
    "Components whose bounding box is more elongated than this are dropped (edge slivers)."
    min_fit: float = 0.6
    "Smallest soft IoU with the best (blurred) ideal shape for a component to count as a detection."
    max_objects: int = 16
    "Most detections kept per class (GenEval's MAX_OBJECTS)."
    position_threshold: float = POSITION_THRESHOLD
    "GenEval's position_threshold for relative positions."
    border: float = 1 / 32
    "Width of the border ring whose median colour is taken as the background (fraction of the side)."
    blur_sigmas: tuple[float, ...] = (0.0, 0.8, 1.6, 2.4)
    "Blur levels (Gaussian sigma in pixels of a 64-px image) the shape templates are tried at."

    def validate(self) -> None:
        for key, values, known in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES)):
            bad = [v for v in values if v not in known]
            if bad or not values or len(set(values)) != len(values):
                raise ConfigError(key, f"need one or more distinct values from {known}, got {list(values)}")
        if not 0 < self.alpha_threshold < 1:
            raise ConfigError("alpha_threshold", f"must be in (0, 1), got {self.alpha_threshold}")
        if not 0 <= self.min_area < 1:
            raise ConfigError("min_area", f"must be in [0, 1) (a fraction of the image area), got {self.min_area}")
        if not self.max_aspect >= 1:  # a bounding box's long / short side is >= 1: below, nothing passes
            raise ConfigError("max_aspect", f"must be >= 1, got {self.max_aspect}")
        if not 0 <= self.min_fit <= 1:  # the fit is a soft IoU in [0, 1]: above 1, nothing is detected
            raise ConfigError("min_fit", f"must be in [0, 1], got {self.min_fit}")
        if self.max_objects < 1:
            raise ConfigError("max_objects", f"must be >= 1, got {self.max_objects}")
        if self.position_threshold < 0:
            raise ConfigError("position_threshold", f"must be >= 0, got {self.position_threshold}")
        if not 0 < self.border < 0.5:
            raise ConfigError("border", f"must be in (0, 0.5) (a fraction of the side), got {self.border}")
        if not self.blur_sigmas or min(self.blur_sigmas) < 0:
            raise ConfigError("blur_sigmas", "need at least one sigma, all >= 0")


@dataclass
class Detection:
    """One detected object; ``bbox`` is ``(x0, y0, x1, y1)`` in pixels (GenEval's box convention)."""

    shape: str
    color: str
    bbox: tuple[float, float, float, float]
    area: float
    confidence: float


Detections = dict[str, list[Detection]]


def as_array(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) array in 0..255 from a PIL image, a path, or an array.

    Arrays must be integer (H, W, 3) with values in 0..255 (uint8, or e.g. int64 after ``np.rint``).
    Float arrays are refused with a ValueError: their range is ambiguous ([0, 1] or [0, 255]), and
    guessing wrong would silently fail every prompt; convert them first, e.g.
    ``(np.clip(x, 0, 1) * 255).round().astype(np.uint8)`` for [0, 1].
    """
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"expected a uint8 image (H, W, 3) in 0..255, got dtype {arr.dtype}; convert a [0, 1] float "
                         "image with (np.clip(x, 0, 1) * 255).round().astype(np.uint8)")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"expected pixel values in 0..255, got {arr.min()}..{arr.max()} ({arr.dtype})")
    return arr.astype(np.uint8)


# ----------------------------------------------------------------------------- detection


def segment(image: Any, cfg: ScorerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour labels (index into ``cfg.colors``, -1 = background) and the background RGB."""
    return _segment(as_array(image).astype(np.float32), cfg or ScorerConfig())


def _segment(x: np.ndarray, cfg: ScorerConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment` of a float32 (H, W, 3) image in 0..255."""
    h, w, _ = x.shape
    b = max(1, round(min(h, w) * cfg.border))
    ring = np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3), x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    d = np.array([PALETTE[c] for c in cfg.colors], np.float32) - bg  # (K, 3) mixing directions
    x = x - bg
    dot = x @ d.T  # (H, W, K)
    dd = np.maximum((d * d).sum(1), 1e-6)
    alpha = np.clip(dot / dd, 0, 1)
    resid = (x * x).sum(-1, keepdims=True) - 2 * alpha * dot + alpha**2 * dd  # |x - a d|^2
    # the colour is the best-fitting mixing line; whether the pixel is object or background is then
    # decided by that colour's mix fraction alone (so a half-white edge pixel is white or background,
    # never a colour such as pink whose line merely projects further)
    resid[alpha < 0.1] = np.inf
    labels = resid.argmin(-1)
    best_alpha = np.take_along_axis(alpha, labels[..., None], -1)[..., 0]
    labels[~np.isfinite(resid.min(-1)) | (best_alpha < cfg.alpha_threshold)] = -1
    return labels, bg


# moment -> box-side factors of the ideal shapes (x: width, y: height): side = sqrt(k * variance)
_VAR_K = {"square": (12.0, 12.0), "circle": (16.0, 16.0), "triangle": (24.0, 18.0)}


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


@dataclass
class Component:
    """A connected single-colour region and its soft coverage map, cut out with a margin."""

    color: str
    own: np.ndarray  # bool (h, w): the component's pixels in the window
    alpha: np.ndarray  # float (h, w): unclipped mix fraction of ``color`` over the local background
    origin: tuple[int, int]  # image (x, y) of the window's top-left corner
    area: float  # pixels with alpha >= alpha_threshold (the component's size)


def components(image: Any, cfg: ScorerConfig, max_sigma: float = 0.0) -> list[Component]:
    """Connected components per colour that pass the size and elongation filters.

    Each window leaves room for a blur fringe of ``max_sigma`` pixels and for wrong-shape
    templates; its background is the median of the window's background pixels away from the
    component (a textured background drifts across the image).
    """
    x = as_array(image).astype(np.float32)
    labels, bg = _segment(x, cfg)
    h, w = labels.shape
    fringe = int(np.ceil(2 * max_sigma)) + 1
    out = []
    for k, color in enumerate(cfg.colors):
        comps, n = ndimage.label(labels == k)  # 4-connectivity: diagonal touches do not merge
        for j, sl in enumerate(ndimage.find_objects(comps) if n else [], start=1):
            bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            area = float((comps[sl] == j).sum())
            if area < cfg.min_area * h * w or max(bw, bh) > cfg.max_aspect * min(bw, bh):
                continue
            pad = fringe + 2 + max(bw, bh) // 3
            r0, r1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
            c0, c1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
            own = comps[r0:r1, c0:c1] == j
            far = (labels[r0:r1, c0:c1] == -1) & ~ndimage.binary_dilation(own, iterations=fringe)
            local_bg = np.median(x[r0:r1, c0:c1][far], axis=0) if far.sum() >= 20 else bg
            d = np.array(PALETTE[color], np.float32) - local_bg
            alpha = ((x[r0:r1, c0:c1] - local_bg) @ d) / max(float(d @ d), 1e-6)
            # pixels of other objects never count towards this one
            alpha[(labels[r0:r1, c0:c1] != -1) & ~own] = 0.0
            out.append(Component(color, own, alpha, (c0, r0), area))
    return out


def fit_shapes(comp: Component, shapes: tuple[str, ...], sigma: float = 0.0) -> list[tuple[str, float, tuple]]:
    """``(shape, soft IoU, sharp box in window coordinates)`` per shape, seen through blur ``sigma``.

    Blur keeps an object's mass and centroid and adds ``sigma**2`` to its variances, so the sharp
    shape's box follows from the component's coverage moments (taken over the component grown by
    2 sigma + 1 px); the template is the ideal shape blurred by ``sigma``. Moments, unlike a
    bounding box, barely move for a stray pixel, a rounded corner or a receding apex.
    """
    region = ndimage.binary_dilation(comp.own, iterations=int(np.ceil(2 * sigma)) + 1)
    region &= (comp.alpha != 0) | comp.own
    a = np.where(region, comp.alpha, 0.0)
    mass = a.sum()
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]] + 0.5  # pixel centres
    cx, cy = (a * xs).sum() / max(mass, 1e-6), (a * ys).sum() / max(mass, 1e-6)
    vx = (a * (xs - cx) ** 2).sum() / max(mass, 1e-6) + 1 / 12 - sigma**2
    vy = (a * (ys - cy) ** 2).sum() / max(mass, 1e-6) + 1 / 12 - sigma**2
    if mass <= 1.0 or vx <= 0.25 or vy <= 0.25:  # less spread than the blur alone: not this blur
        return [(shape, 0.0, (0.0, 0.0, 0.0, 0.0)) for shape in shapes]
    observed = np.clip(a, 0, 1)
    ss = 4 if max(a.shape) <= 64 else 2  # sub-pixel samples: fewer for big windows (256-px images)
    out = []
    for shape in shapes:
        kx, ky = _VAR_K[shape]
        bw, bh = float(np.sqrt(kx * vx)), float(np.sqrt(ky * vy))
        top = cy - (2 * bh / 3 if shape == "triangle" else bh / 2)  # a triangle's centroid is 2/3 down
        box = (cx - bw / 2, top, cx + bw / 2, top + bh)
        (r, c), t = coverage(shape, box, a.shape[0], a.shape[1], ss)
        tmpl = np.zeros_like(a)
        tmpl[r, c] = t
        if sigma > 0:
            tmpl = ndimage.gaussian_filter(tmpl, sigma, truncate=3.0) * region
        out.append((shape, _soft_iou(observed, tmpl), box))
    return out


def classify_shape(comp: Component, shapes: tuple[str, ...], sigma: float = 0.0,
                   method: str = "iou") -> tuple[str, float, tuple]:
    """(shape, confidence, box in window coordinates) of a component.

    ``iou``: the shape whose blurred template (:func:`fit_shapes`) has the highest soft IoU with
    the component's coverage. ``fill``: the naive baseline on the thresholded mask, area / bbox
    area > 0.89 square, > 0.64 circle, else triangle (confidence 1, bbox = the mask's).
    """
    if method == "fill":
        rows, cols = np.nonzero(comp.own.any(1))[0], np.nonzero(comp.own.any(0))[0]
        bbox = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
        fill = comp.own.sum() / max((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]), 1.0)
        return ("square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"), 1.0, bbox
    return max(fit_shapes(comp, shapes, sigma), key=lambda f: f[1])


def detect(image: Any, cfg: ScorerConfig | None = None, method: Literal["iou", "fill"] = "iou") -> Detections:
    """Objects in ``image`` per shape class, most confident first (the order GenEval's rules assume).

    The blur level is chosen per image: the one of ``cfg.blur_sigmas`` under which the templates
    fit all components best (area-weighted), ties going to the sharper one. ``image``: see :func:`as_array`;
    a config built in code is validated here (ConfigError), so bad knobs never just detect nothing.
    """
    cfg = cfg or ScorerConfig()
    cfg.validate()
    arr = as_array(image)
    unit = min(arr.shape[:2]) / 64  # blur_sigmas are in pixels of a 64-px image
    sigmas = [s * unit for s in (cfg.blur_sigmas if method == "iou" else (0.0,))]
    comps = components(arr, cfg, max(sigmas))
    best_total, fits = -1.0, []
    for sigma in sigmas:
        trial = [classify_shape(c, cfg.shapes, sigma, method) for c in comps]
        total = sum(c.area * f[1] for c, f in zip(comps, trial))
        if total > best_total + 1e-6 * max(total, 1.0):
            best_total, fits = total, trial
    out: Detections = {}
    for c, (shape, conf, box) in zip(comps, fits):
        if conf < cfg.min_fit:
            continue
        ox, oy = c.origin
        box = (box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy)
        out.setdefault(shape, []).append(Detection(shape, c.color, box, c.area, conf))
    for shape in out:
        out[shape] = sorted(out[shape], key=lambda d: -d.confidence)[: cfg.max_objects]
    return out


# ----------------------------------------------------------------------------- GenEval rules


def evaluate(detections: Detections, metadata: dict, position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """GenEval's rules on detections: ``(correct, reason)``.

    Re-implements ``evaluate`` of djghosh13/geneval evaluation/evaluate_images.py (MIT): include
    clauses are ANDed and use the ``count`` most confident detections of the class (at least
    ``count`` must exist; with ``color``, that many of them must have it; with ``position
    [rel, i]``, every one must be ``rel`` of every object matched by include clause ``i``);
    exclude clauses fail when the class has ``count`` or more detections.
    """
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = detections.get(cls, [])[:n]
        ok = True
        if len(found) < n:
            ok = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < n:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {cls}>={n}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and ok:
                rel, target = req["position"]
                group = matched[target] if target < len(matched) else None
                if group is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tgt in group:
                            rels = relative_position(obj.bbox, tgt.bbox, position_threshold)
                            if rel not in rels:
                                ok = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(rels))} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        cls = req["class"]
        if len(detections.get(cls, [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {cls}<{req['count']}, found {len(detections[cls])}")
    return correct, "\n".join(reasons)


def score(image: Any, metadata: dict, cfg: ScorerConfig | None = None,
          method: Literal["iou", "fill"] = "iou") -> tuple[bool, str]:
    """GenEval verdict for ``image`` against one GenEval-format metadata dict."""
    cfg = cfg or ScorerConfig()
    return evaluate(detect(image, cfg, method), metadata, cfg.position_threshold)


def truth_detections(objects: list[dict]) -> Detections:
    """A record's ground-truth ``objects`` as detections (confidence 1), to run the rules on truth."""
    out: Detections = {}
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        out.setdefault(o["shape"], []).append(Detection(o["shape"], o["color"], (x0, y0, x1, y1), 0.0, 1.0))
    return out


def agrees(image: Any, record: dict, cfg: ScorerConfig | None = None,
           method: Literal["iou", "fill"] = "iou") -> tuple[bool, str]:
    """Strict agreement with the truth: detected (shape, colour) multiset == the record's objects
    AND ``score(image, record["geneval"])`` is True."""
    cfg = cfg or ScorerConfig()
    dets = detect(image, cfg, method)
    found = Counter((d.shape, d.color) for ds in dets.values() for d in ds)
    truth = Counter((o["shape"], o["color"]) for o in record["objects"])
    if found != truth:
        return False, f"detected {sorted(found.elements())}, truth {sorted(truth.elements())}"
    return evaluate(dets, record["geneval"], cfg.position_threshold)


def degrade(image: np.ndarray, blur_sigma: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (sigma in pixels, per channel) plus Gaussian noise: a stand-in for a blurry
    reconstruction / generation, used by the tests and benchmarks/shapes_scorer.py."""
    x = np.asarray(image, np.float32)
    if blur_sigma > 0:
        x = ndimage.gaussian_filter(x, sigma=(blur_sigma, blur_sigma, 0))
    if noise_std > 0:
        x = x + rng.normal(0, noise_std, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
