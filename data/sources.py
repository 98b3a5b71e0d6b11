r"""Inputs of the shard builder (:mod:`data.build_shards`): each raw input kind read as a stream of :class:`Item`\ s.

- ``folder``: a tree of jpg/jpeg/png/webp images (symlinked folders followed, each real folder read
  once); a UTF-8 sidecar ``<stem>.txt`` (any case of ``.txt``) becomes ``caption``, an image without
  one gets ``{"task": "reconstruct"}``.
- ``jsonl``: one ``{"image": path, "caption": str, ...}`` per line (other fields are kept in ``json``).
- ``llava``: a JSON list of ``{"id", "image", "conversations"}`` with ``<image>`` exactly once.

An input that is already known to be bad (a missing file, a bad record) becomes an Item carrying its skip
reason, so the builder counts it in input order like any other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.schema import (
    BAD_SCHEMA,
    EXT_ALIASES,
    IMAGE_EXTS,
    check_meta,
)

FOLDER, JSONL, LLAVA = "folder", "jsonl", "llava"
KINDS = (FOLDER, JSONL, LLAVA)
FOLDER_SUFFIXES = tuple(f".{ext}" for ext in (*IMAGE_EXTS, *EXT_ALIASES))  # matched case-insensitively
CAPTION_SUFFIX = ".txt"  # matched case-insensitively too
# Skip reasons of the builder (besides the schema kinds BAD_IMAGE / BAD_SCHEMA / ... of check_sample).
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
BAD_CAPTION = "bad_caption"
BAD_RECORD = "bad_record"
UNEXPECTED = "unexpected_error"
WORKER_CRASHED = "worker_crashed"
_NON_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class BuildError(ValueError):
    """Unusable arguments or input; the CLI prints the message and exits with status 2."""


@dataclass(frozen=True)
class Item:
    """One input unit: where its image is, its json, or why it is already known to be bad."""

    ident: str
    key: str = ""
    image: str | None = None
    meta: dict[str, Any] | None = None
    caption_file: str | None = None
    error: tuple[str, str] | None = None


def sanitize_key(name: str) -> str:
    """A KEY_RE-valid key from a path-like name: ``/`` parts kept, other characters (dots too) -> ``_``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(_NON_KEY_CHARS.sub("_", p) for p in parts) or "sample"


def unique_key(base: str, used: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ... if taken; records the result in ``used``."""
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def _folder_items(root: Path) -> tuple[list[Item], list[str]]:
    """Images (with their sidecars) under ``root`` in sorted order, and the ignored paths.

    Symlinked folders are followed; a real folder reached a second time (a link loop, or two links to
    one folder) is read once and listed in ``ignored``. A folder that cannot be listed is a skipped item.
    """
    items: list[Item] = []
    ignored: list[str] = []
    seen = {os.path.realpath(root): str(root)}  # real folder -> the path it is read under

    def unlistable(e: OSError) -> None:
        where = e.filename or root
        items.append(Item(str(where), error=(UNREADABLE_FILE, f"cannot list folder: {e.strerror or e}")))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            path, real = os.path.join(dirpath, d), os.path.realpath(os.path.join(dirpath, d))
            if real in seen:
                ignored.append(f"{path}{os.sep} (the folder {real}, already read as {seen[real]})")
            else:
                seen[real] = path
                keep.append(d)
        dirnames[:] = keep
        images = {n for n in filenames if Path(n).suffix.lower() in FOLDER_SUFFIXES}
        captions: dict[str, list[str]] = {}  # stem -> sidecar names (.txt in any case)
        for n in sorted(filenames):
            if Path(n).suffix.lower() == CAPTION_SUFFIX:
                captions.setdefault(Path(n).stem, []).append(n)
        stems = {Path(n).stem for n in images}
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name in images:
                ident = str(path)
                key = sanitize_key(str(path.relative_to(root).with_suffix("")))
                sidecars = captions.get(path.stem, [])
                if len(sidecars) > 1:
                    items.append(Item(ident, key=key, error=(BAD_CAPTION, f"several caption files: {sidecars}")))
                elif sidecars:
                    items.append(Item(ident, key=key, image=ident, caption_file=str(path.with_name(sidecars[0]))))
                else:
                    items.append(Item(ident, key=key, image=ident, meta={"task": "reconstruct"}))
            elif not (path.suffix.lower() == CAPTION_SUFFIX and path.stem in stems):
                ignored.append(str(path))
    return items, ignored


def _loads(raw: bytes) -> Any:
    """``json.loads`` that also reads a UTF-8 BOM and turns too-deep nesting into a ValueError."""
    try:
        return json.loads(raw.decode("utf-8-sig") if raw.startswith(b"\xef\xbb\xbf") else raw)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def _jsonl_items(path: Path, image_root: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            ident = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines are not records
            try:
                rec = _loads(raw)
            except ValueError as e:
                yield Item(ident, error=(BAD_RECORD, f"invalid JSON: {e}"))
                continue
            if not isinstance(rec, dict):
                yield Item(ident, error=(BAD_RECORD, f"record must be an object, got {type(rec).__name__}"))
                continue
            image, caption = rec.get("image"), rec.get("caption")
            if not isinstance(image, str) or not image:
                yield Item(ident, error=(BAD_RECORD, f"'image' must be a non-empty path string, got {image!r}"))
            elif not isinstance(caption, str):
                yield Item(ident, error=(BAD_RECORD, f"'caption' must be a string, got {caption!r}"))
            elif not caption.strip():
                yield Item(ident, error=(BAD_CAPTION, "empty caption"))
            else:
                rid = rec.get("id")
                base = str(rid) if isinstance(rid, (str, int)) else os.path.splitext(image)[0]
                meta = {k: v for k, v in rec.items() if k != "image"}
                yield Item(ident, key=sanitize_key(base), image=str(image_root / image), meta=meta)


def _llava_items(path: Path, image_root: Path) -> Iterator[Item]:
    try:
        records = _loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: not a readable LLaVA JSON file: {e}") from None
    if not isinstance(records, list):
        raise BuildError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        ident = f"{path}[{i}]" + (f" id={rid}" if rid is not None else "")
        if not isinstance(rec, dict):
            yield Item(ident, error=(BAD_RECORD, f"record must be an object, got {type(rec).__name__}"))
            continue
        image = rec.get("image")
        if not isinstance(image, str) or not image:
            why = "no 'image' (text-only records are not in the schema)" if image is None else f"got {image!r}"
            yield Item(ident, error=(BAD_RECORD, f"'image' must be a non-empty path string: {why}"))
            continue
        if "conversations" not in rec:
            yield Item(ident, error=(BAD_RECORD, "missing 'conversations'"))
            continue
        meta = {k: v for k, v in rec.items() if k != "image"}
        problems = check_meta(meta)
        if problems:
            yield Item(ident, error=(BAD_SCHEMA, "; ".join(problems)))
            continue
        base = str(rid) if isinstance(rid, (str, int)) else f"{i:08d}"
        yield Item(ident, key=sanitize_key(base), image=str(image_root / image), meta=meta)


def detect_kind(src: Path) -> str:
    if src.is_dir():
        return FOLDER
    if src.suffix.lower() == ".jsonl":
        return JSONL
    if src.suffix.lower() == ".json":
        return LLAVA
    raise BuildError(f"cannot tell the input kind of {src}; pass --kind {'|'.join(KINDS)}")


def read_items(src: Path, kind: str, image_root: Path) -> tuple[Iterator[Item], int | None, list[str]]:
    if kind == FOLDER:
        items, ignored = _folder_items(src)
        return iter(items), len(items), ignored
    if kind == JSONL:
        with open(src, "rb") as f:
            total = sum(1 for line in f if line.strip())
        return _jsonl_items(src, image_root), total, []
    records = list(_llava_items(src, image_root))  # the file is one JSON document anyway
    return iter(records), len(records), []
