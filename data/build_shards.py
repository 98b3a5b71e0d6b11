"""Build WebDataset shards in the unimllm sample schema (docs/data.md) from raw inputs.

Input kinds (detected from the path, or ``--kind``; read by :mod:`data.sources`, each item encoded by
:mod:`data.sample_encoder` in worker processes):

- ``folder``: a tree of jpg/jpeg/png/webp images (symlinked folders followed, each real folder read
  once); a UTF-8 sidecar ``<stem>.txt`` (any case of ``.txt``) becomes ``caption``, an image without
  one gets ``{"task": "reconstruct"}``.
- ``jsonl``: one ``{"image": path, "caption": str, ...}`` per line (other fields are kept in ``json``).
- ``llava``: a JSON list of ``{"id", "image", "conversations"}`` with ``<image>`` exactly once.
- ``hf_dataset`` (``save_to_disk``), ``parquet`` (parquet / arrow files), ``wds`` (img2dataset tars): the formats
  datasets ship in; columns named by ``--image_column`` / ``--caption_column`` / ``--conversations_column``.

Bad input is skipped and reported per reason with its identity; every written sample has passed
:func:`data.schema.check_sample`. Workers read/decode/resize/encode, the main process writes in input
order, so the shards are byte-identical for any ``--workers``. A worker process that dies (killed,
out of memory, a crash in a decoder) never hangs the build: the items it may have held are retried
one at a time, and an item that kills a worker on its own is skipped as ``worker_crashed``. A build
that writes no sample at all fails (exit 1) and leaves an earlier build's shards alone. Example::

    python -m data.build_shards images/ --out out/train-%06d.tar --shard_samples 1000 --max_side 512
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.sample_encoder import EncodeOptions, encode_item
from data.schema import IMAGE_EXTS
from data.shard_writer import ShardWriter
from data.sources import (
    FOLDER,
    HF_DATASET,
    JSONL,
    KINDS,
    LLAVA,
    UNEXPECTED,
    WORKER_CRASHED,
    BuildError,
    Columns,
    Item,
    detect_kind,
    read_items,
    unique_key,
)
from unimllm.command_line import FlagParser
from unimllm.files import atomic_write_json
from unimllm.logging import progress_bar

FORMATS = ("keep", *IMAGE_EXTS)
IN_FLIGHT_PER_WORKER = 64  # items submitted ahead of the writer, per worker (bounds memory)
CHUNK = 16  # items per worker job
_PATTERN_NAME = re.compile(r"([^%]*)%(0[1-9]\d*)?d([^%]*)")  # one %d or %0Nd in the file name
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?)?", re.IGNORECASE)


class EmptyBuildError(BuildError):
    """The build ran but wrote no sample; ``summary`` says why. Nothing was deleted (CLI exit status 1)."""

    def __init__(self, message: str, summary: BuildSummary):
        super().__init__(message)
        self.summary = summary


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
    """Folder input: files that are neither images nor sidecar captions, and folders reached a second
    time through a symlink (``<path>/ (...)``; each real folder is read once)."""
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
            lines.append(f"ignored {len(self.ignored)} non-image files or repeated folders, e.g. {self.ignored[0]}")
        lines += [f"removed stale: {p}" for p in self.stale_removed]
        lines.append(f"summary: {self.summary_path}")
        return "\n".join(lines)


def check_pattern(pattern: str) -> None:
    """Raise :class:`BuildError` unless ``pattern`` is ``folder/name%0Nd.ext`` (or ``%d``) with no other ``%``."""
    parent, name = os.path.split(pattern)
    if "%" in parent:
        raise BuildError(f"--out {pattern!r}: the folder part must not contain '%' (only the file name "
                         "holds the shard index, e.g. out/train-%06d.tar)")
    if _PATTERN_NAME.fullmatch(name) is None:
        raise BuildError(f"--out {pattern!r} needs exactly one printf index %d or %0Nd (e.g. %06d) in the file "
                         "name and no other '%', e.g. out/train-%06d.tar")


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


# ----------------------------------------------------------------------------- worker pool


def _work(item: Item, opts: EncodeOptions) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    try:
        return encode_item(item, opts)
    except Exception as e:  # reported per item, never a crash of the whole build
        return None, (UNEXPECTED, f"{type(e).__name__}: {e}")


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def _crashed(job: Future) -> bool:
    """Whether ``job`` failed because its pool broke (a worker process died); waits for it."""
    return job.cancelled() or isinstance(job.exception(), BrokenProcessPool)


def _work_many(items: list[Item], opts: EncodeOptions) -> list[tuple[dict[str, Any] | None, tuple[str, str] | None]]:
    return [_work(item, opts) for item in items]


def _submit(pool: ProcessPoolExecutor, items: list[Item], opts: EncodeOptions) -> Future:
    """One job for a chunk of items (one inter-process round trip for all of them)."""
    try:
        return pool.submit(_work_many, items, opts)
    except BrokenProcessPool as e:  # a worker died since the last check: _recover re-runs these items
        job: Future = Future()
        job.set_exception(e)
        return job


def _done(result: Any) -> Future:
    job: Future = Future()
    job.set_result([result])
    return job


def _recover(pool: ProcessPoolExecutor, pending: deque, opts: EncodeOptions, workers: int) -> ProcessPoolExecutor:
    """After a worker died, every unfinished job of the pool failed: re-run those items one at a time in
    a fresh pool, so only an item that kills a worker on its own is blamed (``worker_crashed``)."""
    pool.shutdown(wait=True, cancel_futures=True)
    pool = _pool(workers)
    for entry in pending:
        item, job, _ = entry
        if job is None or job is _UNSENT or not _crashed(job):
            continue
        retry = _submit(pool, [item], opts)
        if _crashed(retry):
            pool.shutdown(wait=True, cancel_futures=True)
            pool = _pool(workers)
            retry = _done((None, (WORKER_CRASHED, "the worker process died on this item (killed, out of memory "
                                                  "or a crash in a decoder); it was retried alone and died again")))
        entry[1:] = [retry, 0]
    return pool


_UNSENT = object()  # an item waiting for its chunk to fill


def _outcomes(items: Iterator[Item], opts: EncodeOptions, workers: int) -> Iterator[tuple[Item, Any, Any]]:
    """``(item, sample, error)`` in input order, with a bounded number of items in flight.

    ``workers > 1``: a ``spawn`` process pool fed chunks of :data:`CHUNK` items (per-item round trips cost more
    than decoding a small image); a dead worker is detected (never a hang), see :func:`_recover`.
    ``workers == 1`` works in this process, so an item that kills the process ends the build.
    """
    if workers <= 1:
        for item in items:
            yield (item, None, item.error) if item.error else (item, *_work(item, opts))
        return
    pool = _pool(workers)
    pending: deque = deque()  # [item, job (None: known bad, _UNSENT: not submitted yet), index in the job]
    chunk: list[list] = []

    def send() -> None:
        if chunk:
            job = _submit(pool, [e[0] for e in chunk], opts)
            for j, e in enumerate(chunk):
                e[1:] = [job, j]
            chunk.clear()

    try:
        for item in itertools.chain(items, [None]):
            if item is not None:
                entry = [item, None if item.error else _UNSENT, 0]
                pending.append(entry)
                if entry[1] is _UNSENT:
                    chunk.append(entry)
                    if len(chunk) >= CHUNK:
                        send()
            while pending and (item is None or len(pending) >= IN_FLIGHT_PER_WORKER * workers):
                if pending[0][1] is _UNSENT:
                    send()
                if pending[0][1] is not None and _crashed(pending[0][1]):
                    pool = _recover(pool, pending, opts, workers)
                done, job, j = pending.popleft()
                if job is None:
                    yield done, None, done.error
                    continue
                try:
                    result = job.result()[j]
                except Exception as e:  # e.g. an item that cannot be pickled to the worker
                    result = None, (UNEXPECTED, f"{type(e).__name__}: {e}")
                yield (done, *result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- build


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
    columns: Columns | None = None,
) -> BuildSummary:
    """Write the valid samples of ``input`` to shards ``out % i``; raise :class:`BuildError` on bad arguments."""
    t0 = time.monotonic()
    src, pattern = Path(input), str(out)
    if not src.exists():
        raise BuildError(f"input {src} does not exist")
    kind = kind or detect_kind(src)
    if kind not in KINDS:
        raise BuildError(f"unknown input kind {kind!r}; choose from {KINDS}")
    needs = {FOLDER: "folder", HF_DATASET: "folder", JSONL: "file", LLAVA: "file"}.get(kind)
    if needs is not None and (needs == "folder") != src.is_dir():
        raise BuildError(f"input kind {kind!r} needs a {needs}, got {src}")
    root = Path(image_root) if image_root is not None else src.parent
    if kind in (JSONL, LLAVA) and not root.is_dir():
        raise BuildError(f"image root {root} is not a folder")
    check_pattern(pattern)
    if shard_samples < 0 or shard_bytes < 0 or (shard_samples == 0 and shard_bytes == 0):
        raise BuildError("set --shard_samples and/or --shard_bytes to a positive value")
    if max_side < 0 or workers < 1 or not 1 <= quality <= 100:
        raise BuildError("need --max_side >= 0, --workers >= 1 and 1 <= --quality <= 100")
    if fmt not in FORMATS:
        raise BuildError(f"unknown --format {fmt!r}; choose from {FORMATS}")
    summary_file = Path(summary_path) if summary_path else Path(pattern).parent / "build_summary.json"

    items, total, ignored = read_items(src, kind, root, columns or Columns())
    summary = BuildSummary(str(src), kind, pattern, ignored=ignored, summary_path=str(summary_file))
    failed_file = summary_file.with_name(summary_file.stem + ".failed" + summary_file.suffix)

    used: set[str] = set()
    bar = progress_bar(total=total, enabled=progress, unit="img", desc="build_shards")
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
                if writer.total_samples == 0:  # the earlier build's shards start to change:
                    summary_file.unlink(missing_ok=True)  # no summary = no finished build
                writer.write({**sample, "__key__": key})
    finally:
        bar.close()
    summary.samples, summary.shards, summary.bytes = writer.total_samples, writer.written, writer.total_bytes
    if summary.samples == 0:  # e.g. a wrong --image_root: keep whatever an earlier build wrote
        summary.summary_path = str(failed_file)
        summary.seconds = time.monotonic() - t0
        atomic_write_json(failed_file, summary.to_dict())
        counts = ", ".join(f"{n} {reason}" for reason, n in summary.skip_counts.items()) or "the input has no items"
        raise EmptyBuildError(f"no sample was written ({counts}); nothing was deleted, an earlier build's shards "
                              f"and summary are untouched; skipped items are listed in {failed_file}", summary)
    written = {os.path.abspath(p) for p in writer.written}
    stale = [p for p in shard_files(pattern) if os.path.abspath(p) not in written]  # an earlier, larger run's tail
    stale += shard_files(pattern, ".tmp")  # left by a crashed earlier run
    for path in [*stale, *([failed_file] if failed_file.exists() else [])]:  # (and a failed attempt's report)
        path.unlink()
        summary.stale_removed.append(str(path))
    summary.seconds = time.monotonic() - t0
    atomic_write_json(summary_file, summary.to_dict())
    return summary




def main(argv: list[str] | None = None) -> int:
    p = FlagParser(prog="python -m data.build_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="image folder, JSONL file, LLaVA JSON file, save_to_disk dataset folder, parquet/arrow "
                   "file(s), or img2dataset tar(s) (a file, brace pattern or folder)")
    p.add_argument("--out", required=True, help="printf shard pattern, e.g. out/train-%%06d.tar")
    p.add_argument("--kind", choices=KINDS, help="input kind (default: from the path, data.sources.detect_kind)")
    p.add_argument("--image_column", default="image", help="hf_dataset/parquet: image bytes, Image feature or path")
    p.add_argument("--caption_column", default="caption", help="hf_dataset/parquet/wds json: the caption")
    p.add_argument("--conversations_column", default="conversations", help="LLaVA-style turns (instead of a caption)")
    p.add_argument("--split", default="train", help="hf_dataset: the split of a saved DatasetDict")
    p.add_argument("--image_root", help="folder that relative image paths are resolved against "
                   "(default: the JSON/JSONL file's folder)")
    p.add_argument("--shard_samples", type=int, help="samples per shard (default 1000 unless --shard_bytes)")
    p.add_argument("--shard_bytes", type=parse_size, default=0, help="max member bytes per shard, e.g. 1G")
    p.add_argument("--max_side", type=int, default=0, help="resize so the longer side is <= this (0: off)")
    p.add_argument("--format", default="keep", choices=FORMATS, help="image format written (keep: source)")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality when re-encoding")
    p.add_argument("--workers", type=int, default=1, help="processes that decode/resize/encode")
    p.add_argument("--summary", help="summary JSON path (default: <shard folder>/build_summary.json)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    shard_samples = args.shard_samples if args.shard_samples is not None else (0 if args.shard_bytes else 1000)
    try:
        summary = build(
            args.input, args.out, kind=args.kind, image_root=args.image_root, shard_samples=shard_samples,
            shard_bytes=args.shard_bytes, max_side=args.max_side, fmt=args.format, quality=args.quality,
            workers=args.workers, summary_path=args.summary, progress=True,
            columns=Columns(args.image_column, args.caption_column, args.conversations_column, args.split),
        )
    except EmptyBuildError as e:
        print(e.summary.format())
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 1
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
