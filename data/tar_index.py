"""Random-access index of a WebDataset tar shard.

:func:`index_shard` scans tar headers once (no data is read) and records, per sample, the byte
ranges of its members. Reading a sample is then one ``seek`` + ``read`` with no tar parsing, which
is what lets the loader split shards at sample granularity across ranks and workers and restore
a mid-epoch position in O(1).

Corruption is never silent: a bad header is recorded as an error and the scan resynchronises at
the next valid header; a member whose data runs past the end of the file is recorded and dropped.
A file with no readable sample raises :class:`ShardError` naming it.
"""

from __future__ import annotations

import mmap
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from data.schema import normalize_ext

BLOCK = 512
CORRUPT_TAR = "corrupt_tar"
TRUNCATED = "truncated_member"
BAD_MEMBER = "bad_member_name"
DUPLICATE_MEMBER = "duplicate_member"
# WebDataset's rule: the key is everything up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(RuntimeError):
    """A shard that cannot be used at all (missing, not a tar, no readable sample)."""


@dataclass
class ShardIndex:
    """Per-sample member layout of one shard."""

    path: str
    keys: list[str] = field(default_factory=list)
    exts: list[tuple[str, ...]] = field(default_factory=list)
    """Member extensions of each sample, aligned with ``spans``."""
    spans: list[np.ndarray] = field(default_factory=list)
    """Per sample, an int64 array (n_members, 2) of (data offset, size)."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(kind, message) for everything the scan had to skip; counted by the loader and validator."""

    def __len__(self) -> int:
        return len(self.keys)


def _is_valid_header(block: bytes) -> bool:
    if len(block) < BLOCK or block.count(0) == BLOCK:
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def _members(f: BinaryIO, size: int, path: str, errors: list[tuple[str, str]]) -> Iterator[tarfile.TarInfo]:
    """Regular-file members in file order, resynchronising after corrupt headers."""
    pos = 0
    while pos < size:
        f.seek(pos)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            tf, stop = None, pos
            reason = str(e)
        else:
            end = pos
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError as e:  # data of the previous member cut off by EOF
                    errors.append((TRUNCATED, f"{path}: {e} after byte {end}"))
                    return
                if m is None:
                    break
                end = m.offset_data + (m.size + BLOCK - 1) // BLOCK * BLOCK
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    errors.append((TRUNCATED, f"{path}: member {m.name!r} runs past the end of the file"))
                    return
                yield m
            stop, reason = end, "bad tar header"
            f.seek(stop)
            block = f.read(BLOCK)
            if len(block) < BLOCK or block.count(0) == BLOCK:
                return  # clean end of archive (zero blocks) or end of file
        # A corrupt header at `stop`: find the next block that parses as a header.
        nxt = stop + BLOCK
        f.seek(nxt)
        while nxt < size and not _is_valid_header(f.read(BLOCK)):
            nxt += BLOCK
        if pos == 0 and stop == 0 and nxt >= size:
            raise ShardError(f"{path}: not a tar file ({reason})")
        errors.append((CORRUPT_TAR, f"{path}: {reason} at byte {stop}; skipped {nxt - stop} bytes"))
        pos = nxt


def index_shard(path: str | os.PathLike) -> ShardIndex:
    """Scan a shard's headers; group consecutive members by key (WebDataset semantics)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard not found")
    size = os.path.getsize(path)
    idx = ShardIndex(path)
    cur_key: str | None = None
    cur_exts: list[str] = []
    cur_spans: list[tuple[int, int]] = []

    def flush() -> None:
        if cur_key is not None and cur_exts:
            idx.keys.append(cur_key)
            idx.exts.append(tuple(cur_exts))
            idx.spans.append(np.asarray(cur_spans, dtype=np.int64).reshape(-1, 2))

    with open(path, "rb") as f:
        for m in _members(f, size, path, idx.errors):
            match = _KEY_EXT.match(m.name)
            if not match:
                idx.errors.append((BAD_MEMBER, f"{path}: member {m.name!r} has no <key>.<ext> form"))
                continue
            key, ext = match.group(1), normalize_ext(match.group(2))
            if key != cur_key:
                flush()
                cur_key, cur_exts, cur_spans = key, [], []
            if ext in cur_exts:
                idx.errors.append((DUPLICATE_MEMBER, f"{path}: sample {key!r} has two {ext!r} members"))
                continue
            cur_exts.append(ext)
            cur_spans.append((m.offset_data, m.size))
        flush()
    if not idx.keys:
        detail = "; ".join(msg for _, msg in idx.errors[:3]) or "no members"
        raise ShardError(f"{path}: no readable sample ({detail})")
    return idx


def read_sample(f: BinaryIO | mmap.mmap, idx: ShardIndex, i: int) -> dict[str, bytes | str]:
    """Raw sample ``i`` as ``{"__key__": key, "__shard__": path, ext: bytes, ...}``.

    ``f`` is the open shard file or (faster: no seek/read syscalls) an ``mmap`` of it.
    """
    spans = idx.spans[i]
    sample: dict[str, bytes | str] = {"__key__": idx.keys[i], "__shard__": idx.path}
    if isinstance(f, mmap.mmap):
        for ext, (off, n) in zip(idx.exts[i], spans.tolist()):
            sample[ext] = f[off : off + n]
        return sample
    start = int(spans[0, 0])
    stop = int((spans[:, 0] + spans[:, 1]).max())
    f.seek(start)
    buf = f.read(stop - start)
    for ext, (off, n) in zip(idx.exts[i], spans.tolist()):
        sample[ext] = buf[off - start : off - start + n]
    return sample


def open_mmap(path: str) -> mmap.mmap:
    """Read-only memory map of a shard (for :func:`read_sample`)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, bytes | str]]:
    """Every sample of one shard, in order (index errors are in ``index_shard(path).errors``)."""
    idx = index_shard(path)
    with open(idx.path, "rb") as f:
        for i in range(len(idx)):
            yield read_sample(f, idx, i)
