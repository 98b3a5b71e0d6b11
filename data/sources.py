r"""Inputs of the shard builder (:mod:`data.build_shards`): each raw input kind read as a stream of :class:`Item`\ s.

- ``folder``: a tree of jpg/jpeg/png/webp images (symlinked folders followed, each real folder read
  once); a UTF-8 sidecar ``<stem>.txt`` (any case of ``.txt``) becomes ``caption``, an image without
  one gets ``{"task": "reconstruct"}``.
- ``jsonl``: one ``{"image": path, "caption": str, ...}`` per line (other fields are kept in ``json``).
- ``llava``: a JSON list of ``{"id", "image", "conversations"}`` with ``<image>`` exactly once.
- ``hf_dataset``: a Hugging Face dataset written by ``save_to_disk`` (a folder with ``state.json``; a
  ``DatasetDict``'s ``--split``); ``parquet``: ``.parquet`` / ``.arrow`` files (a file or a folder of them).
  Both are read with the ``datasets`` library, row by row (memory-mapped / streamed: memory stays flat).
  The image column holds encoded bytes, a Hugging Face ``Image`` feature or a path (relative to the image
  root); the caption and conversations columns are named in :class:`Columns`; every other JSON-able column is
  kept in the sample's json, and an ``id`` column becomes the key.
- ``wds``: img2dataset output, WebDataset tars of ``<key>.jpg`` + ``<key>.txt`` (caption) + ``<key>.json``
  (kept as the json; its caption field is used when there is no ``.txt``): a tar, a brace pattern or a folder.

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

import braceexpand

from data.schema import BAD_SCHEMA, EXT_ALIASES, IMAGE_EXTS, check_meta
from data.tar_index import ShardError, iter_shard

FOLDER, JSONL, LLAVA = "folder", "jsonl", "llava"
HF_DATASET, PARQUET, WDS = "hf_dataset", "parquet", "wds"
KINDS = (FOLDER, JSONL, LLAVA, HF_DATASET, PARQUET, WDS)
TABLE_SUFFIXES = (".parquet", ".arrow")
FOLDER_SUFFIXES = tuple(f".{ext}" for ext in (*IMAGE_EXTS, *EXT_ALIASES))  # matched case-insensitively
CAPTION_SUFFIX = ".txt"  # matched case-insensitively too
# Skip reasons of the builder (besides the schema kinds BAD_IMAGE / BAD_SCHEMA / ... of check_sample).
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
BAD_CAPTION = "bad_caption"
BAD_RECORD = "bad_record"
MISSING_COLUMN = "missing_column"
UNEXPECTED = "unexpected_error"
WORKER_CRASHED = "worker_crashed"
_NON_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class BuildError(ValueError):
    """Unusable arguments or input; the CLI prints the message and exits with status 2."""


@dataclass(frozen=True)
class Item:
    """One input unit: where its image is (a file, or its encoded bytes), its json, or why it is already known
    to be bad."""

    ident: str
    key: str = ""
    image: str | None = None
    meta: dict[str, Any] | None = None
    caption_file: str | None = None
    error: tuple[str, str] | None = None
    image_bytes: bytes | None = None


@dataclass(frozen=True)
class Columns:
    """Where a table's (``hf_dataset`` / ``parquet``) or an img2dataset json's fields are."""

    image: str = "image"
    """Encoded image bytes, a Hugging Face ``Image`` feature ({bytes, path}) or a path string."""
    caption: str = "caption"
    """A caption string (a row without it must have conversations)."""
    conversations: str = "conversations"
    """LLaVA-style turns (``[{"from", "value"}, ...]``); used instead of the caption when present."""
    split: str = "train"
    """The split of a ``DatasetDict`` saved with ``save_to_disk``."""


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


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _row_item(row: dict, ident: str, index: int, cols: Columns, image_root: Path) -> Item:
    """One table row -> an Item (image bytes or path, json of the other columns) or a skipped Item."""
    image = row.get(cols.image)
    if image is None:
        return Item(ident, error=(MISSING_COLUMN, f"no '{cols.image}' (image column)"))
    data, path = None, None
    if isinstance(image, dict):  # a Hugging Face Image feature read without decoding: {"bytes", "path"}
        data, path = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, str):
        path = image
    else:
        return Item(ident, error=(BAD_RECORD, f"'{cols.image}' must be image bytes or a path, got "
                                               f"{type(image).__name__}"))
    if not data and not path:
        return Item(ident, error=(MISSING_COLUMN, f"'{cols.image}' holds neither bytes nor a path"))
    meta = {k: v for k, v in row.items() if k not in (cols.image, cols.caption, cols.conversations)
            and v is not None and _jsonable(v)}
    conversations, caption = row.get(cols.conversations), row.get(cols.caption)
    if conversations is not None:
        meta["conversations"] = conversations
        problems = check_meta(meta)
        if problems:
            return Item(ident, error=(BAD_SCHEMA, "; ".join(problems)))
    elif caption is None:
        return Item(ident, error=(MISSING_COLUMN, f"no '{cols.caption}' (caption) or '{cols.conversations}' "
                                                  "(conversations) column"))
    elif not isinstance(caption, str):
        return Item(ident, error=(BAD_RECORD, f"'{cols.caption}' must be a string, got {type(caption).__name__}"))
    elif not caption.strip():
        return Item(ident, error=(BAD_CAPTION, "empty caption"))
    else:
        meta["caption"] = caption
    rid = row.get("id")
    key = sanitize_key(str(rid)) if isinstance(rid, (str, int)) and str(rid) else f"{index:08d}"
    if data:
        return Item(ident, key=key, meta=meta, image=ident, image_bytes=bytes(data))
    return Item(ident, key=key, meta=meta, image=str(image_root / path))


def _table(src: Path, kind: str, cols: Columns):
    """(rows, total) of a saved Hugging Face dataset or parquet / arrow files, image column undecoded."""
    import datasets

    if kind == HF_DATASET:
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            if cols.split not in ds:
                raise BuildError(f"{src}: a DatasetDict without split {cols.split!r} (has {sorted(ds)}); pass --split")
            ds = ds[cols.split]
        total = len(ds)
    else:
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            raise BuildError(f"{src}: no {'/'.join(TABLE_SUFFIXES)} files")
        builder = "arrow" if files[0].suffix.lower() == ".arrow" else "parquet"
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        total = _parquet_rows(files) if builder == "parquet" else None
    features = ds.features or {}
    if cols.image not in features and features:
        raise BuildError(f"{src}: no image column {cols.image!r} (columns: {sorted(features)}); pass --image_column")
    if isinstance(features.get(cols.image), datasets.Image):
        ds = ds.cast_column(cols.image, datasets.Image(decode=False))  # the stored bytes, not a PIL image
    rows = ds if kind != HF_DATASET else ds.to_iterable_dataset()  # row by row from the memory-mapped arrow
    return iter(rows), total


def _parquet_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _table_items(src: Path, kind: str, cols: Columns, image_root: Path) -> tuple[Iterator[Item], int | None]:
    rows, total = _table(src, kind, cols)
    return (_row_item(row, f"{src}[{i}]", i, cols, image_root) for i, row in enumerate(rows)), total


def _wds_shards(src: Path) -> list[str]:
    if src.is_dir():
        return [str(p) for p in sorted(src.glob("*.tar"))]
    return list(braceexpand.braceexpand(str(src)))


def _wds_items(shards: list[str], cols: Columns) -> Iterator[Item]:
    for shard in shards:
        try:
            samples = iter_shard(shard)
            for sample in samples:
                key = str(sample["__key__"])
                ident = f"{shard}:{key}"
                exts = {k.lower(): k for k in sample if not k.startswith("__")}
                ext = next((exts[e] for e in (*IMAGE_EXTS, *EXT_ALIASES) if e in exts), None)
                if ext is None:
                    yield Item(ident, error=(MISSING_COLUMN, f"no image member ({'/'.join(IMAGE_EXTS)})"))
                    continue
                meta: dict[str, Any] = {}
                if "json" in exts:
                    try:
                        meta = _loads(sample[exts["json"]])
                    except ValueError as e:
                        yield Item(ident, error=(BAD_RECORD, f"{key}.json: invalid JSON: {e}"))
                        continue
                    if not isinstance(meta, dict):
                        yield Item(ident, error=(BAD_RECORD, f"{key}.json must hold an object"))
                        continue
                caption = meta.get(cols.caption)
                if "txt" in exts:
                    try:
                        caption = sample[exts["txt"]].decode("utf-8-sig")
                    except UnicodeDecodeError as e:
                        yield Item(ident, error=(BAD_CAPTION, f"{key}.txt is not UTF-8 ({e})"))
                        continue
                if cols.conversations in meta:
                    meta["conversations"] = meta.pop(cols.conversations)
                elif not isinstance(caption, str):
                    yield Item(ident, error=(MISSING_COLUMN, f"no caption ({key}.txt or '{cols.caption}' in its json)"))
                    continue
                elif not caption.strip():
                    yield Item(ident, error=(BAD_CAPTION, "empty caption"))
                    continue
                else:
                    meta = {k: v for k, v in meta.items() if k != cols.caption}
                    meta["caption"] = caption.strip()
                yield Item(ident, key=sanitize_key(key), meta=meta, image=ident, image_bytes=bytes(sample[ext]))
        except ShardError as e:
            yield Item(shard, error=(UNREADABLE_FILE, str(e)))


def detect_kind(src: Path) -> str:
    name = src.name.lower()
    if src.is_dir():
        if (src / "state.json").is_file() or (src / "dataset_dict.json").is_file():
            return HF_DATASET
        files = [p.suffix.lower() for p in src.iterdir() if p.is_file()]
        if files and all(f in TABLE_SUFFIXES for f in files if f not in (".json", ".md")):
            return PARQUET
        if files and all(f == ".tar" for f in files if f not in (".json", ".md", ".parquet")) and ".tar" in files:
            return WDS
        return FOLDER
    if src.suffix.lower() == ".jsonl":
        return JSONL
    if src.suffix.lower() == ".json":
        return LLAVA
    if src.suffix.lower() in TABLE_SUFFIXES:
        return PARQUET
    if name.endswith(".tar"):
        return WDS
    raise BuildError(f"cannot tell the input kind of {src}; pass --kind {'|'.join(KINDS)}")


def read_items(src: Path, kind: str, image_root: Path, cols: Columns = Columns()
               ) -> tuple[Iterator[Item], int | None, list[str]]:
    if kind == FOLDER:
        items, ignored = _folder_items(src)
        return iter(items), len(items), ignored
    if kind == JSONL:
        with open(src, "rb") as f:
            total = sum(1 for line in f if line.strip())
        return _jsonl_items(src, image_root), total, []
    if kind in (HF_DATASET, PARQUET):
        items, total = _table_items(src, kind, cols, image_root)
        return items, total, []
    if kind == WDS:
        shards = _wds_shards(src)
        if not shards:
            raise BuildError(f"{src}: no .tar shards")
        return _wds_items(shards, cols), None, []
    records = list(_llava_items(src, image_root))  # the file is one JSON document anyway
    return iter(records), len(records), []
