"""The one sample schema of unimllm WebDataset shards (documented in docs/data.md).

A sample is the group of consecutive tar members sharing a key (``<key>.<ext>``):

- ``__key__``: unique within the shard set; letters, digits, ``_ - /``; no dots (WebDataset splits
  the member name at the first dot of its basename).
- exactly one image: ``jpg`` / ``png`` / ``webp`` (``jpeg`` is read as ``jpg``).
- ``json``: an object with at least one of ``caption`` (str), ``conversations`` (LLaVA list of
  ``{"from": "human"|"gpt", "value": str}``; ``<image>`` appears exactly once in all turns together) or
  ``task`` (``understand`` / ``generate`` / ``reconstruct``). Other keys are kept as they are.
- optional ``codes.npy``: precomputed tokenizer codes, an integer array (H, W, L) saved by ``np.save``.

:func:`check_sample` returns all problems of a raw sample as ``(kind, message)`` pairs (builder,
``data.validate``); the loader uses the same per-member checks (:func:`sample_image`,
:func:`sample_meta`, :func:`sample_codes`), which raise :class:`SampleError`, so all agree on validity.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any

import numpy as np
from PIL import Image

from unimllm.errors import SampleError  # noqa: F401 - re-exported: data raises it, the loader counts it by kind

try:  # JPEG straight into a numpy array (libjpeg-turbo, bitwise equal to PIL's full-scale decode)
    import simplejpeg
except ImportError:  # pragma: no cover - optional speed-up, PIL is the fallback
    simplejpeg = None

IMAGE_EXTS = ("jpg", "png", "webp")
EXT_ALIASES = {"jpeg": "jpg"}
TASKS = ("understand", "generate", "reconstruct")
ROLES = ("human", "gpt")
IMAGE_TOKEN = "<image>"
CODES_EXT = "codes.npy"
KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}

# Error kinds, shared by the builder summary, data.validate and the loader's skip counters.
MISSING_IMAGE = "missing_image"
MULTIPLE_IMAGES = "multiple_images"
BAD_IMAGE = "bad_image"
MISSING_JSON = "missing_json"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
BAD_CODES = "bad_codes"
BAD_KEY = "bad_key"


def normalize_ext(ext: str) -> str:
    ext = ext.lower()
    return EXT_ALIASES.get(ext, ext)


def image_ext(sample: dict[str, Any]) -> str | None:
    """The image member's extension, or None (callers check_sample first for ambiguity)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Fully decode image bytes to RGB (truncated files raise, they are not padded with grey).

    ``min_side``: the caller only needs a short side >= min_side, so JPEGs may be decoded at a
    reduced DCT scale (PIL draft mode: 1/2, 1/4, 1/8), never below it.
    """
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
        scale = min_side / min(img.size)
        img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_pixels(data: bytes, min_side: int | None = None) -> np.ndarray | Image.Image:
    """Decode for training: JPEG -> uint8 array (H, W, 3) via simplejpeg; anything else -> PIL RGB.

    Same validity rules as :func:`decode_image` (simplejpeg is strict; on its error PIL decides).
    """
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            kw = {}
            if min_side:
                h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                if min(h, w) >= 2 * min_side:
                    scale = min_side / min(h, w)
                    kw = {"min_height": math.ceil(h * scale), "min_width": math.ceil(w * scale)}
            return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
        except ValueError:
            pass  # e.g. CMYK or a recoverable libjpeg warning: let PIL decide
    return decode_image(data, min_side)


def encode_image(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    """Encode a PIL image as ``ext`` (jpg/png/webp)."""
    buf = io.BytesIO()
    fmt = PIL_FORMATS[normalize_ext(ext)]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {"optimize": False, "compress_level": 1}
    (img.convert("RGB") if img.mode not in ("RGB", "L") else img).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode_codes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(codes), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be an integer array (H, W, L), got {arr.dtype} {arr.shape}")
    return arr


def check_meta(meta: Any) -> list[str]:
    """Schema problems of a decoded ``json`` member (empty list = valid)."""
    if not isinstance(meta, dict):
        return [f"json must be an object, got {type(meta).__name__}"]
    problems = []
    if not any(k in meta for k in ("caption", "conversations", "task")):
        problems.append("json needs at least one of 'caption', 'conversations', 'task'")
    if "caption" in meta and not isinstance(meta["caption"], str):
        problems.append("'caption' must be a string")
    if "task" in meta and meta["task"] not in TASKS:
        problems.append(f"'task' must be one of {TASKS}, got {meta['task']!r}")
    if "conversations" in meta:
        conv = meta["conversations"]
        if not isinstance(conv, list) or not conv:
            problems.append("'conversations' must be a non-empty list")
        else:
            n_image = 0
            for i, turn in enumerate(conv):
                if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                    problems.append(f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}")
                    break
                n_image += turn["value"].count(IMAGE_TOKEN)
            else:
                if n_image != 1:
                    problems.append(f"conversations must contain '{IMAGE_TOKEN}' exactly once, found {n_image}")
    return problems




def sample_image(sample: dict[str, Any], min_side: int | None = None) -> Image.Image:
    """The decoded RGB image of a raw sample (see :func:`decode_image`), or SampleError."""
    images = [e for e in IMAGE_EXTS if e in sample]
    if not images:
        raise SampleError(MISSING_IMAGE, "no jpg/png/webp member")
    if len(images) > 1:
        raise SampleError(MULTIPLE_IMAGES, f"several image members: {images}")
    try:
        return decode_image(sample[images[0]], min_side)
    except Exception as e:  # PIL raises many types for corrupt data
        raise SampleError(BAD_IMAGE, f"{images[0]}: {type(e).__name__}: {e}") from None


def sample_meta(sample: dict[str, Any]) -> dict:
    """The parsed, schema-checked ``json`` member, or SampleError(missing/bad json, bad schema)."""
    if "json" not in sample:
        raise SampleError(MISSING_JSON, "no json member")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly nested json
        raise SampleError(BAD_JSON, f"json: {type(e).__name__}: {str(e)[:200]}") from None
    problems = check_meta(meta)
    if problems:
        raise SampleError(BAD_SCHEMA, "; ".join(problems))
    return meta


def sample_pixels(sample: dict[str, Any], min_side: int | None = None) -> np.ndarray | Image.Image:
    """Like :func:`sample_image` but through the fast :func:`decode_pixels` (training path)."""
    images = [e for e in IMAGE_EXTS if e in sample]
    if len(images) != 1:
        sample_image(sample)  # raises the right SampleError
    try:
        return decode_pixels(sample[images[0]], min_side)
    except Exception as e:
        raise SampleError(BAD_IMAGE, f"{images[0]}: {type(e).__name__}: {e}") from None


def sample_codes(sample: dict[str, Any]) -> np.ndarray | None:
    """The ``codes.npy`` array if present, or SampleError(bad codes)."""
    if CODES_EXT not in sample:
        return None
    try:
        return decode_codes(sample[CODES_EXT])
    except Exception as e:
        raise SampleError(BAD_CODES, f"{CODES_EXT}: {e}") from None


def check_sample(sample: dict[str, Any], *, decode: bool = True) -> list[tuple[str, str]]:
    """All schema problems of a raw sample ``{"__key__": str, ext: bytes, ...}`` as (kind, message).

    ``decode=False`` skips decoding the image (only its presence is checked).
    """
    errors: list[tuple[str, str]] = []
    key = sample.get("__key__", "")
    if not isinstance(key, str) or not KEY_RE.match(key):
        errors.append((BAD_KEY, f"key {key!r} must match {KEY_RE.pattern}"))
    checks = [sample_meta, sample_codes]
    if decode:
        checks.insert(0, sample_image)
    elif not any(e in sample for e in IMAGE_EXTS):
        errors.append((MISSING_IMAGE, "no jpg/png/webp member"))
    for check in checks:
        try:
            check(sample)
        except SampleError as e:
            errors.append((e.kind, str(e)))
    return errors


def make_sample(
    key: str,
    image: Image.Image | bytes,
    meta: dict,
    *,
    ext: str = "png",
    codes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Assemble a raw sample in the schema (image encoded unless given as bytes)."""
    ext = normalize_ext(ext)
    sample: dict[str, Any] = {
        "__key__": key,
        ext: image if isinstance(image, bytes) else encode_image(image, ext),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    if codes is not None:
        sample[CODES_EXT] = encode_codes(codes)
    return sample
