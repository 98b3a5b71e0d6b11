"""Streaming loader over WebDataset shards: exact per-epoch splits, mixing, counted skips, resumable.

How work is split (epoch mode, ``resampled: false``):
  1. Every shard is indexed once (``data.tar_index``): sample counts and member byte ranges.
  2. Per epoch, the shard list (each source repeated by its whole-number weight) is shuffled with
     ``(seed, epoch)`` - identical on every rank - and viewed as one sequence of N samples.
  3. Global worker g = rank * W + w of G = world * W takes the contiguous range [gN/G, (g+1)N/G),
     so there is no duplicate and no missing sample, at any number of workers, even more than shards.
  4. Within its range a worker reads shards sequentially through a shuffle buffer seeded by
     ``(seed, epoch, rank, worker)``.
Resampled mode draws, per sample, a source with probability proportional to its weight and streams
random shards of it (with replacement), through the same buffer; it never ends.

Workers batch and collate themselves; every batch carries (worker, position reached, skip counts),
so the main process knows exactly what was consumed. ``state_dict()`` stores the epoch, each worker's
position and which worker delivers next (batches arrive round-robin); ``load_state_dict()`` restarts
every worker at its position and rotates worker ids so the next batch is the one that would have come.
Random augmentation is seeded by the sample's position, so a resumed run reproduces it exactly.

Bad samples raise :class:`data.schema.SampleError` (or anything else) in the map function; they are
skipped and counted per reason (``loader.skip_counts()``), never dropped silently.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.config import DataConfig
from data.schema import SampleError, sample_codes, sample_meta, sample_pixels
from data.tar_index import ShardIndex, index_shard, open_mmap, read_sample
from data.transforms import ImageTransform

log = logging.getLogger(__name__)

STATE_VERSION = 1
RawSample = dict  # {"__key__": str, "__shard__": str, ext: bytes, ...}


def expand_shards(spec: str) -> list[str]:
    """``'a-{000..002}.tar::b.tar'`` -> the list of paths (brace expansion, '::' separates patterns)."""
    return [p for part in spec.split("::") if part.strip() for p in braceexpand.braceexpand(part.strip())]


def existing_shards(spec: str, field: str) -> list[str]:
    """``expand_shards(spec)``, every path an existing file; else FileNotFoundError naming the config field."""
    paths = expand_shards(spec)
    if not paths:
        raise FileNotFoundError(f"{field}: pattern {spec!r} matches no path")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{field}: {len(missing)} of the {len(paths)} shards of {spec!r} do not exist "
                                f"(first: {missing[0]})")
    return paths


class SampleContext:
    """What a map function knows about the sample it processes; ``rng`` is seeded by its position."""

    def __init__(self, seed: Sequence[int]):
        self._seed = list(seed)
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:  # created lazily: most eval-time samples never need randomness
            self._rng = np.random.default_rng(self._seed)
        return self._rng


MapFn = Callable[[RawSample, SampleContext], Any]
CollateFn = Callable[[list], Any]


class ImageTextDecoder:
    """Default map function: raw sample -> ``{"__key__", "image" uint8 (R, R, 3), "json"?, "codes"?}``.

    Images stay uint8 until :func:`data.transforms.normalize` runs on the training device; ``json`` is
    parsed and checked only when ``cfg.read_json`` (image-only stages skip that cost).
    """

    def __init__(self, cfg: DataConfig):
        self.transform = ImageTransform(cfg.image)
        self.read_json = cfg.read_json

    def __call__(self, raw: RawSample, ctx: SampleContext) -> dict:
        out: dict[str, Any] = {"__key__": raw["__key__"]}
        if self.read_json:
            out["json"] = sample_meta(raw)
        img = sample_pixels(raw, self.transform.decode_min_side)
        out["image"] = self.transform(img, ctx.rng if self.transform.needs_rng else None)
        codes = sample_codes(raw)
        if codes is not None:
            out["codes"] = codes.astype(np.int64)  # (H, W, L)
        return out


def collate(samples: list[dict]) -> dict:
    """Stack same-shape tensors/arrays into tensors; keep the rest as lists (missing key -> None)."""
    keys = list(samples[0]) if all(len(s) == len(samples[0]) for s in samples) else []
    if not keys or any(k not in s for s in samples for k in keys):
        keys = list(dict.fromkeys(k for s in samples for k in s))
    out: dict[str, Any] = {}
    for k in keys:
        vals = [s.get(k) for s in samples]
        kind = type(vals[0])
        if kind is np.ndarray or kind is torch.Tensor:
            shape = vals[0].shape
            if all(type(v) is kind and v.shape == shape for v in vals):
                out[k] = torch.from_numpy(np.stack(vals)) if kind is np.ndarray else torch.stack(vals)
                continue
        out[k] = vals
    return out


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Classic shuffle buffer: fill ``size`` items, then emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    draws: list[int] = []  # buffer slots drawn 1024 at a time (one numpy call, not one per item)
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if not draws:
            draws = rng.integers(size, size=1024).tolist()[::-1]
        j = draws.pop()
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class ShardSet:
    """All sources' shards, indexed; the split/order logic shared by every rank and worker."""

    def __init__(self, cfg: DataConfig):
        if not cfg.sources:
            raise ValueError("data.sources: no shard source configured")
        self.cfg = cfg
        self.shards: list[ShardIndex] = []
        self.source_shards: list[np.ndarray] = []  # per source: shard ids
        self.names = [s.name or f"source{i}" for i, s in enumerate(cfg.sources)]
        self.index_errors: Counter = Counter()
        for i, src in enumerate(cfg.sources):
            paths = existing_shards(src.shards, f"data.sources.{i}.shards")
            ids = []
            for p in paths:
                idx = index_shard(p)  # ShardError names the shard if it is unusable
                for kind, msg in idx.errors:
                    self.index_errors[kind] += 1
                    log.warning("data: %s", msg)
                ids.append(len(self.shards))
                self.shards.append(idx)
            self.source_shards.append(np.asarray(ids, dtype=np.int64))
        self.lengths = np.asarray([len(s) for s in self.shards], dtype=np.int64)

    def epoch_sequence(self, epoch: int) -> np.ndarray:
        """Shard ids of one epoch (repeats included), shuffled by (seed, epoch) unless shuffle is off."""
        seq = np.concatenate(
            [np.tile(ids, int(src.weight)) for ids, src in zip(self.source_shards, self.cfg.sources)]
        )
        if self.cfg.shuffle_buffer > 0:
            seq = seq[np.random.default_rng([self.cfg.seed, epoch]).permutation(len(seq))]
        return seq

    def epoch_size(self) -> int:
        return int(sum(self.lengths[ids].sum() * int(s.weight) for ids, s in zip(self.source_shards, self.cfg.sources)))

    def worker_range(self, g: int, n_global: int) -> tuple[int, int]:
        n = self.epoch_size()
        return g * n // n_global, (g + 1) * n // n_global

    def epoch_refs(self, epoch: int, g: int, n_global: int) -> Iterator[tuple[int, int]]:
        """(shard id, sample index) of global worker g's contiguous slice of the epoch, in shard order."""
        seq = self.epoch_sequence(epoch)
        cum = np.concatenate([[0], np.cumsum(self.lengths[seq])])  # (S+1,)
        lo, hi = self.worker_range(g, n_global)
        pos = np.arange(lo, hi)
        which = np.searchsorted(cum, pos, side="right") - 1  # position -> index into seq
        return zip(seq[which].tolist(), (pos - cum[which]).tolist())

    def resampled_refs(self, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
        """Endless (shard id, sample index): source ~ weight per sample, random shard when one runs out."""
        w = np.asarray([s.weight for s in self.cfg.sources], dtype=np.float64)
        p = w / w.sum()
        cursor: list[list[int] | None] = [None] * len(w)  # per source: [shard id, next sample]
        while True:
            s = int(rng.choice(len(p), p=p)) if len(p) > 1 else 0
            cur = cursor[s]
            if cur is None or cur[1] >= self.lengths[cur[0]]:
                ids = self.source_shards[s]
                cur = cursor[s] = [int(ids[rng.integers(len(ids))]), 0]
            yield cur[0], cur[1]
            cur[1] += 1


class _WorkerStream(IterableDataset):
    """What each DataLoader worker runs: ordered refs -> read -> map -> batches with provenance."""

    def __init__(self, shardset: ShardSet, rank: int, world: int, n_workers: int, epoch: int,
                 consumed: list[int], rotation: int, map_fn: MapFn, collate_fn: CollateFn):
        self.s, self.rank, self.world, self.n_workers = shardset, rank, world, n_workers
        self.epoch, self.consumed, self.rotation = epoch, consumed, rotation
        self.map_fn, self.collate_fn = map_fn, collate_fn

    def order(self, logical: int) -> Iterator[tuple[int, int]]:
        cfg = self.s.cfg
        if cfg.resampled:
            refs = self.s.resampled_refs(np.random.default_rng([cfg.seed, self.rank, logical, 1]))
        else:
            refs = self.s.epoch_refs(self.epoch, self.rank * self.n_workers + logical, self.world * self.n_workers)
        buf_rng = np.random.default_rng([cfg.seed, self.epoch, self.rank, logical, 2])
        return buffer_shuffle(refs, cfg.shuffle_buffer, buf_rng)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.n_workers
        cfg = self.s.cfg
        start = self.consumed[logical]
        files: dict[int, Any] = {}
        items: list = []
        skipped: Counter = Counter()
        examples: dict[str, str] = {}
        end = start  # position after the last sample handled
        try:
            for pos, (sid, i) in enumerate(itertools.islice(self.order(logical), start, None), start):
                idx = self.s.shards[sid]
                try:
                    f = files.get(sid) or files.setdefault(sid, open_mmap(idx.path))
                    raw = read_sample(f, idx, i)
                    ctx = SampleContext([cfg.seed, self.epoch, self.rank, logical, pos])
                    items.append(self.map_fn(raw, ctx))
                except Exception as e:  # counted, never silent
                    kind = e.kind if isinstance(e, SampleError) else type(e).__name__
                    skipped[kind] += 1
                    examples.setdefault(kind, f"{idx.path}:{idx.keys[i]}: {e}")
                end = pos + 1
                if len(items) == cfg.batch_size:
                    yield self._payload(items, logical, end, skipped, examples)
                    items, skipped, examples = [], Counter(), {}
            if cfg.drop_last:
                items = []
            if items or skipped:
                yield self._payload(items, logical, end, skipped, examples)
        finally:
            for f in files.values():
                f.close()

    def _payload(self, items: list, logical: int, end: int, skipped: Counter, examples: dict) -> dict:
        return {
            "data": self.collate_fn(items) if items else None,
            "n": len(items),
            "worker": logical,
            "end": end,
            "skipped": dict(skipped),
            "examples": dict(examples),
        }


def _as_is(payload: dict) -> dict:
    """The DataLoader's collate: workers already collated (its default would walk every json element)."""
    return payload


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # never oversubscribe cores: decode is per-worker single-threaded work


class StreamingLoader:
    """Iterate batches of one epoch (epoch mode) or forever (resampled), resumable exactly.

    ``for batch in loader`` runs the current epoch from the saved position, then advances the epoch.
    """

    def __init__(self, cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                 map_fn: MapFn | None = None, collate_fn: CollateFn | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shardset = ShardSet(cfg)
        self.map_fn = map_fn or ImageTextDecoder(cfg)
        self.collate_fn = collate_fn or collate
        self.n_logical = max(1, cfg.num_workers)
        self.epoch = 0
        self.consumed = [0] * self.n_logical
        self.next_worker = 0
        self.skipped: Counter = Counter()
        self.skip_examples: dict[str, str] = {}

    # ---------------------------------------------------------------------------------- iteration
    def num_samples(self) -> int | None:
        """Samples this rank reads per epoch (epoch mode), before skips; None when resampled."""
        if self.cfg.resampled:
            return None
        w = self.n_logical
        return sum(b - a for a, b in (self.shardset.worker_range(self.rank * w + i, self.world_size * w) for i in range(w)))

    def __iter__(self) -> Iterator[Any]:
        cfg = self.cfg
        stream = _WorkerStream(self.shardset, self.rank, self.world_size, self.n_logical, self.epoch,
                               list(self.consumed), self.next_worker, self.map_fn, self.collate_fn)
        if cfg.num_workers == 0:
            payloads: Any = iter(stream)
        else:
            # Its own generator: creating the iterator must not draw from the global torch RNG (a
            # resumed run creates one mid-epoch; that draw would shift the model's dropout masks).
            gen = torch.Generator().manual_seed(hash((cfg.seed, self.epoch, self.rank)) % 2**63)
            payloads = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, generator=gen,
                                  prefetch_factor=cfg.prefetch_factor, worker_init_fn=_worker_init, collate_fn=_as_is,
                                  persistent_workers=False, in_order=True)
        for p in payloads:
            self.consumed[p["worker"]] = p["end"]
            self.next_worker = (p["worker"] + 1) % self.n_logical
            self.skipped.update(p["skipped"])
            for kind, msg in p["examples"].items():
                if kind not in self.skip_examples:
                    self.skip_examples[kind] = msg
                    log.warning("data: skipped a sample (%s): %s", kind, msg)
            if p["n"]:
                yield p["data"]
        self.epoch += 1
        self.consumed = [0] * self.n_logical
        self.next_worker = 0

    def batches(self) -> Iterator[Any]:
        """Endless batches across epochs (for step-based training)."""
        while True:
            yield from self

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason so far: read-time skips plus tar-index errors."""
        return dict(self.skipped + self.shardset.index_errors)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "next_worker": self.next_worker,
            "skipped": dict(self.skipped),
            "skip_examples": dict(self.skip_examples),
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.n_logical,
            "seed": self.cfg.seed,
            "resampled": self.cfg.resampled,
            "epoch_size": self.shardset.epoch_size(),
        }

    def load_state_dict(self, state: dict) -> None:
        expect = {"version": STATE_VERSION, "world_size": self.world_size, "rank": self.rank,
                  "num_workers": self.n_logical, "seed": self.cfg.seed, "resampled": self.cfg.resampled,
                  "epoch_size": self.shardset.epoch_size()}
        for k, v in expect.items():
            if state.get(k) != v:
                raise ValueError(
                    f"data loader state: {k}={state.get(k)!r} in the checkpoint but {v!r} now; "
                    "exact resume needs the same shards, seed, world size and worker count"
                )
        self.epoch = int(state["epoch"])
        self.consumed = [int(c) for c in state["consumed"]]
        self.next_worker = int(state["next_worker"])
        self.skipped = Counter(state["skipped"])
        self.skip_examples = dict(state["skip_examples"])



def eval_loader(shards: str, batch_size: int, resolution: int, *, rank: int = 0, world_size: int = 1) -> StreamingLoader:
    """One in-order pass over held-out shards (this rank's share): center crop, json read, no workers."""
    from data.config import ImageConfig, SourceConfig

    cfg = DataConfig(sources=[SourceConfig(shards=shards)], batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                     read_json=True, image=ImageConfig(resolution=resolution, crop="center"))
    return StreamingLoader(cfg, rank=rank, world_size=world_size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data.loader --config launch/configs/data/shapes-demo.yaml [--dotted.overrides]``.

    Runs one epoch (or ``--max_batches`` when resampled is on) of the configured loader on this
    process and reports samples, throughput and skip counts: a check of a data config before training.
    """
    import sys
    import time

    from unimllm.command_line import parse_cli

    cfg = parse_cli(DataConfig, argv)
    if not cfg.sources:
        print("config error: data.sources is empty", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    loader = StreamingLoader(cfg)
    limit = 1000 if cfg.resampled else None  # a resampled stream never ends
    t0, n, b = time.perf_counter(), 0, 0
    for batch in itertools.islice(iter(loader), limit):
        n += len(batch["__key__"])
        b += 1
    dt = time.perf_counter() - t0
    print(f"shards: {len(loader.shardset.shards)}  epoch size: {loader.shardset.epoch_size()}  "
          f"batches: {b}  samples: {n}  {n / max(dt, 1e-9):.0f} samples/s")
    print(f"skipped: {loader.skip_counts() or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
