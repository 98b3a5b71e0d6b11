"""Per-item work of the shard builder, run in its worker processes: read, decode, orient, resize and encode one
:class:`data.sources.Item` into a checked raw sample (or a skip reason)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from data.schema import (
    BAD_IMAGE,
    PIL_FORMATS,
    check_sample,
    decode_image,
    decode_pixels,
    encode_image,
    make_sample,
)
from data.sources import BAD_CAPTION, MISSING_FILE, UNREADABLE_FILE, Item

# MPO: the multi-picture JPEG of many cameras; its bytes start with a plain JPEG that every decoder reads.
_PIL_TO_EXT = {**{fmt: ext for ext, fmt in PIL_FORMATS.items()}, "MPO": "jpg"}
_ORIENTATION = 0x0112  # EXIF tag; value -> the transpose that makes the pixels upright
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int = 0
    fmt: str = "keep"
    quality: int = 95


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def encode_item(item: Item, opts: EncodeOptions) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """Read, decode, resize and encode one item: ``(checked raw sample, None)`` or ``(None, (reason, msg))``."""
    meta = item.meta
    if item.caption_file is not None:
        try:
            caption = Path(item.caption_file).read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            return None, (BAD_CAPTION, f"{item.caption_file}: caption is not UTF-8 ({e})")
        except OSError as e:
            return None, (UNREADABLE_FILE, f"{item.caption_file}: {e.strerror or e}")
        if not caption:
            return None, (BAD_CAPTION, f"{item.caption_file}: empty caption")
        meta = {"caption": caption}
    assert item.image is not None and meta is not None
    try:
        data = item.image_bytes if item.image_bytes is not None else Path(item.image).read_bytes()
    except FileNotFoundError:
        return None, (MISSING_FILE, "no such file")
    except OSError as e:
        return None, (UNREADABLE_FILE, str(e.strerror or e))
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header: format, size, EXIF orientation
            src_ext, size = _PIL_TO_EXT.get(probe.format or ""), probe.size
            try:
                orientation = probe.getexif().get(_ORIENTATION, 1)
            except Exception:  # an unreadable EXIF block: the pixels as stored
                orientation = 1
        ext = (src_ext or "png") if opts.fmt == "keep" else opts.fmt
        upright = _UPRIGHT.get(orientation)  # EXIF-rotated camera images are stored upright (re-encoded)
        resize = opts.max_side > 0 and max(size) > opts.max_side
        if resize or upright is not None or ext != src_ext:
            img = decode_image(data)
        else:  # stored as it is: only check that it decodes whole, as the loader will (simplejpeg for JPEG)
            img = None
            decode_pixels(data)
    except UnidentifiedImageError:
        return None, (BAD_IMAGE, "empty file" if not data else "not an image PIL can read")
    except Exception as e:  # PIL raises many types for corrupt data
        return None, (BAD_IMAGE, f"{type(e).__name__}: {e}")
    if img is not None:
        if upright is not None:
            img = img.transpose(upright)
        if resize:
            img = img.resize(_fit(img.size, opts.max_side), Image.Resampling.LANCZOS)
        data = encode_image(img, ext, opts.quality)
    sample = make_sample(item.key, data, meta, ext=ext)
    problems = check_sample(sample, decode=False)  # the image was decoded above: no second decode
    if problems:
        return None, (problems[0][0], "; ".join(msg for _, msg in problems))
    return sample, None
