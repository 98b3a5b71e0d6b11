"""Build WebDataset shards in the unimllm sample schema (docs/data.md) from raw inputs.

Input kinds (detected from the path, or ``--kind``):

- ``folder``: a tree of jpg/jpeg/png/webp images; a UTF-8 sidecar ``<stem>.txt`` becomes ``caption``,
  an image without one gets ``{"task": "reconstruct"}``.
- ``jsonl``: one ``{"image": path, "caption": str, ...}`` per line (other fields are kept in ``json``).
- ``llava``: a JSON list of ``{"id", "image", "conversations"}`` with ``<image>`` exactly once.

Bad input is skipped and reported per reason with its identity; every written sample has passed
:func:`data.schema.check_sample`. Workers read/decode/resize/encode, the main process writes in input
order, so the shards are byte-identical for any ``--workers``. Example::

    python -m data.build_shards images/ --out out/train-%06d.tar --shard-samples 1000 --max-side 512
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.schema import (
    BAD_IMAGE,
    BAD_SCHEMA,
    IMAGE_EXTS,
    PIL_FORMATS,
    check_meta,
    check_sample,
    decode_image,
    encode_image,
    make_sample,
)
from data.shard_writer import ShardWriter

FOLDER, JSONL, LLAVA = "folder", "jsonl", "llava"
KINDS = (FOLDER, JSONL, LLAVA)
FORMATS = ("keep", *IMAGE_EXTS)
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Skip reasons of the builder (besides the schema kinds BAD_IMAGE / BAD_SCHEMA / ... of check_sample).
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
BAD_CAPTION = "bad_caption"
BAD_RECORD = "bad_record"
UNEXPECTED = "unexpected_error"
IN_FLIGHT_PER_WORKER = 16  # items submitted ahead of the writer, per worker (bounds memory)

_PIL_TO_EXT = {fmt: ext for ext, fmt in PIL_FORMATS.items()}
_NON_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
_PATTERN_NAME = re.compile(r"([^%]*)%(0?\d*)d([^%]*)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


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


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int = 0
    fmt: str = "keep"
    quality: int = 95


@dataclass
class BuildSummary:
    """What a build did; also written as JSON next to the shards."""

    input: str
    kind: str
    pattern: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    """reason -> [{"item": identity, "message": why}] in input order."""
    ignored: list[str] = field(default_factory=list)
    """Folder input: files that are neither images nor sidecar captions."""
    stale_removed: list[str] = field(default_factory=list)
    summary_path: str = ""
    seconds: float = 0.0

    def skip(self, reason: str, ident: str, message: str) -> None:
        self.skipped.setdefault(reason, []).append({"item": ident, "message": message})

    @property
    def skip_counts(self) -> dict[str, int]:
        return {reason: len(items) for reason, items in sorted(self.skipped.items())}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip_counts": self.skip_counts}

    def format(self, max_listed: int = 20) -> str:
        lines = [
            f"wrote {self.samples} samples in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB) "
            f"to {self.pattern} in {self.seconds:.1f} s"
        ]
        n_skipped = sum(self.skip_counts.values())
        lines.append(f"skipped {n_skipped}" + (":" if n_skipped else ""))
        for reason, items in sorted(self.skipped.items()):
            lines.append(f"  {reason} ({len(items)}):")
            lines += [f"    {it['item']}: {it['message']}" for it in items[:max_listed]]
            if len(items) > max_listed:
                lines.append(f"    ... and {len(items) - max_listed} more (see {self.summary_path})")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} non-image files, e.g. {self.ignored[0]}")
        lines += [f"removed stale: {p}" for p in self.stale_removed]
        lines.append(f"summary: {self.summary_path}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- keys and patterns


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


def shard_files(pattern: str, suffix: str = "") -> list[Path]:
    """Existing files named ``pattern % i + suffix`` for any ``i`` (e.g. an earlier run's shards)."""
    parent, name = os.path.split(pattern)
    m = _PATTERN_NAME.fullmatch(name)
    folder = Path(parent or ".")
    if m is None or not folder.is_dir():
        return []
    rx = re.compile(re.escape(m[1]) + r"(\d+)" + re.escape(m[3] + suffix))
    return sorted(
        p for p in folder.iterdir() if (hit := rx.fullmatch(p.name)) and name % int(hit[1]) + suffix == p.name
    )


def parse_size(text: str) -> int:
    """``"500000"``, ``"500k"``, ``"1.5G"`` (powers of 1000) or ``"64MiB"`` (powers of 1024) -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500000, 500k, 1G, 64MiB)")
    power = "kmgt".index(m[2].lower()) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


# ----------------------------------------------------------------------------- input readers


def _folder_items(root: Path) -> tuple[list[Item], list[str]]:
    items, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        images = {n for n in filenames if Path(n).suffix.lower() in FOLDER_SUFFIXES}
        stems = {Path(n).stem for n in images}
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name in images:
                sidecar = path.with_suffix(".txt")
                has_caption = sidecar.name in names
                items.append(
                    Item(
                        str(path),
                        key=sanitize_key(str(path.relative_to(root).with_suffix(""))),
                        image=str(path),
                        meta=None if has_caption else {"task": "reconstruct"},
                        caption_file=str(sidecar) if has_caption else None,
                    )
                )
            elif not (path.suffix == ".txt" and path.stem in stems):
                ignored.append(str(path))
    return items, ignored


def _jsonl_items(path: Path, image_root: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            ident = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines are not records
            try:
                rec = json.loads(raw)
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
        records = json.loads(path.read_bytes())
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


# ----------------------------------------------------------------------------- per-item work


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def encode_item(item: Item, opts: EncodeOptions) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """Read, decode, resize and encode one item: ``(checked raw sample, None)`` or ``(None, (reason, msg))``."""
    meta = item.meta
    if item.caption_file is not None:
        try:
            caption = Path(item.caption_file).read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return None, (BAD_CAPTION, f"{item.caption_file}: caption is not UTF-8 ({e})")
        except OSError as e:
            return None, (UNREADABLE_FILE, f"{item.caption_file}: {e.strerror or e}")
        if not caption:
            return None, (BAD_CAPTION, f"{item.caption_file}: empty caption")
        meta = {"caption": caption}
    assert item.image is not None and meta is not None
    try:
        data = Path(item.image).read_bytes()
    except FileNotFoundError:
        return None, (MISSING_FILE, "no such file")
    except OSError as e:
        return None, (UNREADABLE_FILE, str(e.strerror or e))
    try:
        with Image.open(io.BytesIO(data)) as probe:
            src_ext = _PIL_TO_EXT.get(probe.format or "")
        img = decode_image(data)
    except UnidentifiedImageError:
        return None, (BAD_IMAGE, "empty file" if not data else "not an image PIL can read")
    except Exception as e:  # PIL raises many types for corrupt data
        return None, (BAD_IMAGE, f"{type(e).__name__}: {e}")
    ext = (src_ext or "png") if opts.fmt == "keep" else opts.fmt
    resize = opts.max_side > 0 and max(img.size) > opts.max_side
    if resize:
        img = img.resize(_fit(img.size, opts.max_side), Image.Resampling.LANCZOS)
    if resize or ext != src_ext:
        data = encode_image(img, ext, opts.quality)
    sample = make_sample(item.key, data, meta, ext=ext)
    problems = check_sample(sample)
    if problems:
        return None, (problems[0][0], "; ".join(msg for _, msg in problems))
    return sample, None


def _work(item: Item, opts: EncodeOptions) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    try:
        return encode_item(item, opts)
    except Exception as e:  # reported per item, never a crash of the whole build
        return None, (UNEXPECTED, f"{type(e).__name__}: {e}")


def _outcomes(items: Iterator[Item], opts: EncodeOptions, workers: int) -> Iterator[tuple[Item, Any, Any]]:
    """``(item, sample, error)`` in input order, with a bounded number of items in flight."""
    if workers <= 1:
        for item in items:
            yield (item, None, item.error) if item.error else (item, *_work(item, opts))
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for item in itertools.chain(items, [None]):
            if item is not None:
                pending.append((item, None if item.error else pool.apply_async(_work, (item, opts))))
            while pending and (item is None or len(pending) >= IN_FLIGHT_PER_WORKER * workers):
                done, job = pending.popleft()
                yield (done, None, done.error) if job is None else (done, *job.get())


# ----------------------------------------------------------------------------- build


def detect_kind(src: Path) -> str:
    if src.is_dir():
        return FOLDER
    if src.suffix.lower() == ".jsonl":
        return JSONL
    if src.suffix.lower() == ".json":
        return LLAVA
    raise BuildError(f"cannot tell the input kind of {src}; pass --kind {'|'.join(KINDS)}")


def _read_items(src: Path, kind: str, image_root: Path) -> tuple[Iterator[Item], int | None, list[str]]:
    if kind == FOLDER:
        items, ignored = _folder_items(src)
        return iter(items), len(items), ignored
    if kind == JSONL:
        with open(src, "rb") as f:
            total = sum(1 for line in f if line.strip())
        return _jsonl_items(src, image_root), total, []
    records = list(_llava_items(src, image_root))  # the file is one JSON document anyway
    return iter(records), len(records), []


def build(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str | None = None,
    image_root: str | os.PathLike | None = None,
    shard_samples: int = 1000,
    shard_bytes: int = 0,
    max_side: int = 0,
    fmt: str = "keep",
    quality: int = 95,
    workers: int = 1,
    summary_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> BuildSummary:
    """Write the valid samples of ``input`` to shards ``out % i``; raise :class:`BuildError` on bad arguments."""
    t0 = time.monotonic()
    src, pattern = Path(input), str(out)
    if not src.exists():
        raise BuildError(f"input {src} does not exist")
    kind = kind or detect_kind(src)
    if kind not in KINDS:
        raise BuildError(f"unknown input kind {kind!r}; choose from {KINDS}")
    if (kind == FOLDER) != src.is_dir():
        raise BuildError(f"input kind {kind!r} needs a {'folder' if kind == FOLDER else 'file'}, got {src}")
    root = Path(image_root) if image_root is not None else src.parent
    if kind != FOLDER and not root.is_dir():
        raise BuildError(f"image root {root} is not a folder")
    if _PATTERN_NAME.fullmatch(os.path.basename(pattern)) is None:
        raise BuildError(f"--out {pattern!r} needs one printf index in the file name, e.g. out/train-%06d.tar")
    if shard_samples < 0 or shard_bytes < 0 or (shard_samples == 0 and shard_bytes == 0):
        raise BuildError("set --shard-samples and/or --shard-bytes to a positive value")
    if max_side < 0 or workers < 1 or not 1 <= quality <= 100:
        raise BuildError("need --max-side >= 0, --workers >= 1 and 1 <= --quality <= 100")
    if fmt not in FORMATS:
        raise BuildError(f"unknown --format {fmt!r}; choose from {FORMATS}")
    summary_file = Path(summary_path) if summary_path else Path(pattern).parent / "build_summary.json"

    items, total, ignored = _read_items(src, kind, root)
    summary = BuildSummary(str(src), kind, pattern, ignored=ignored, summary_path=str(summary_file))
    for tmp in shard_files(pattern, ".tmp"):  # left by a crashed earlier run
        tmp.unlink()
        summary.stale_removed.append(str(tmp))
    summary_file.unlink(missing_ok=True)  # no summary = no finished build

    used: set[str] = set()
    bar = tqdm(total=total, disable=not progress, file=sys.stderr, unit="img", desc="build_shards")
    try:
        with ShardWriter(pattern, shard_samples, shard_bytes) as writer:
            for item, sample, error in _outcomes(items, EncodeOptions(max_side, fmt, quality), workers):
                bar.update()
                if error is not None:
                    reason, message = error
                    if item.image not in (None, item.ident):  # name the image of a JSON record
                        message = f"{item.image}: {message}"
                    summary.skip(reason, item.ident, message)
                    bar.set_postfix(skipped=sum(summary.skip_counts.values()), refresh=False)
                    continue
                key = unique_key(sample["__key__"], used)
                writer.write({**sample, "__key__": key})
    finally:
        bar.close()
    summary.samples, summary.shards, summary.bytes = writer.total_samples, writer.written, writer.total_bytes
    written = {os.path.abspath(p) for p in writer.written}
    for stale in shard_files(pattern):  # an earlier, larger run's tail
        if os.path.abspath(stale) not in written:
            stale.unlink()
            summary.stale_removed.append(str(stale))
    summary.seconds = time.monotonic() - t0
    summary_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = summary_file.with_name(summary_file.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, summary_file)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.build_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="image folder, JSONL file or LLaVA JSON file")
    p.add_argument("--out", required=True, help="printf shard pattern, e.g. out/train-%%06d.tar")
    p.add_argument("--kind", choices=KINDS, help="input kind (default: folder / .jsonl / .json)")
    p.add_argument("--image-root", help="folder that relative image paths are resolved against "
                   "(default: the JSON/JSONL file's folder)")
    p.add_argument("--shard-samples", type=int, help="samples per shard (default 1000 unless --shard-bytes)")
    p.add_argument("--shard-bytes", type=parse_size, default=0, help="max member bytes per shard, e.g. 1G")
    p.add_argument("--max-side", type=int, default=0, help="resize so the longer side is <= this (0: off)")
    p.add_argument("--format", default="keep", choices=FORMATS, help="image format written (keep: source)")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    p.add_argument("--workers", type=int, default=1, help="processes that decode/resize/encode")
    p.add_argument("--summary", help="summary JSON path (default: <shard folder>/build_summary.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    shard_samples = args.shard_samples if args.shard_samples is not None else (0 if args.shard_bytes else 1000)
    try:
        summary = build(
            args.input, args.out, kind=args.kind, image_root=args.image_root, shard_samples=shard_samples,
            shard_bytes=args.shard_bytes, max_side=args.max_side, fmt=args.format, quality=args.quality,
            workers=args.workers, summary_path=args.summary, progress=not args.no_progress,
        )
    except BuildError as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build_shards: interrupted; finished shards are complete, the open one was removed", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
