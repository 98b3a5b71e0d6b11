"""Encode WebDataset image shards once with a frozen EvoTok tokenizer; write shards that carry ``codes.npy``.

Stage 2 then reads each sample's codes (H, W, L_sem) instead of running the tokenizer encoder every step::

    python -m unimllm.stages.precompute_codes --tokenizer runs/stage1/tiny/export/tokenizer \\
        --shards 'runs/shapes/demo/train/shapes-train-{000000..000003}.tar' --out runs/shapes/demo/train-codes

Each input shard gives one output shard of the same file name in ``--out``, written atomically (``.tmp``
then rename). A good sample keeps every member byte for byte (a ``.jpeg`` member is stored as ``.jpg``,
the loader's name for it; members are in the writer's order) and gets ``codes.npy`` (replacing any old
one): the codes of its image decoded and center-cropped exactly as the loader's ``ImageTextDecoder`` does
at the tokenizer's resolution, uint16 when the codebook has <= 65536 codes, else int32. Bad samples are
skipped and counted per reason. ``<out>/codes_manifest.json`` records the tokenizer (directory, sha256 of the tensors of
``model.safetensors``), grid, depth, codebook size, resolution and per-shard counts; a re-run skips shards
already written with the same tokenizer (``--overwrite`` redoes them). Stage 2 checks its tokenizer with
:func:`tokenizer_fingerprint` and :func:`codes_mismatch`.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a command: set the OpenMP wait policy before torch loads (unimllm.runtime)
    from unimllm.runtime import cpu_thread_defaults

    cpu_thread_defaults()

import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.config import DataConfig, ImageConfig
from data.loader import ImageTextDecoder, SampleContext, expand_shards
from data.schema import BAD_KEY, CODES_EXT, KEY_RE, SampleError, encode_codes
from data.shard_writer import ShardWriter
from data.tar_index import ShardError, index_shard, read_sample
from data.transforms import normalize
from unimllm.command_line import FlagParser
from unimllm.files import atomic_write_json
from unimllm.logging import progress_bar
from unimllm.precision import resolve_eval_precision
from unimllm.stages.artifacts import tokenizer_fingerprint

if TYPE_CHECKING:
    from tokenizer.model import EvoTokenizer

log = logging.getLogger(__name__)

MANIFEST_NAME = "codes_manifest.json"
PARTIAL_PREFIX = "codes_manifest.rank"  # + 00000-of-00002.json: one rank's finished shards until the merge
MANIFEST_VERSION = 3  # 3: no timings (the same file for any number of ranks); 2: tensors' fingerprint
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecomputeError(ValueError):
    """An unusable argument (``arg``) or input; the CLI prints the message and exits with status 2."""

    def __init__(self, arg: str, message: str):
        self.arg = arg
        super().__init__(f"{arg}: {message}")


def read_codes_manifest(shard_path: str | os.PathLike) -> dict | None:
    """The ``codes_manifest.json`` in the shard's folder, or None if there is none."""
    path = Path(shard_path).parent / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def codes_mismatch(shard_path: str | os.PathLike, fingerprint: str) -> str | None:
    """Why the shard's precomputed codes may not be from the tokenizer with ``fingerprint``; None if they are."""
    manifest = read_codes_manifest(shard_path)
    if manifest is None:
        return f"{shard_path}: no {MANIFEST_NAME} in its folder (not written by unimllm.stages.precompute_codes)"
    entry = manifest.get("shards", {}).get(Path(shard_path).name)
    if entry is None:
        return f"{shard_path}: not listed in {MANIFEST_NAME} (unfinished or stale)"
    if entry.get("tokenizer_sha256") != fingerprint:
        return (f"{shard_path}: codes come from tokenizer {entry.get('tokenizer_sha256', '?')[:12]}, "
                f"not {fingerprint[:12]} ({manifest.get('tokenizer')})")
    return None


def codes_match_tokenizer(shards: list[str], tokenizer_dir: str) -> bool | None:
    """True when every shard's codes came from this tokenizer, False (with the reason raised) when some did
    not, None when no shard has a codes manifest."""
    if all(read_codes_manifest(s) is None for s in shards):
        return None
    fp = tokenizer_fingerprint(tokenizer_dir)
    for s in shards:
        reason = codes_mismatch(s, fp)
        if reason:
            raise ValueError(f"data.sources: {s}: precomputed codes do not fit model.tokenizer {tokenizer_dir}: "
                             f"{reason}; re-run python -m unimllm.stages.precompute_codes")
    return True


def codes_dtype(codebook_size: int) -> np.dtype:
    """uint16 for codebooks of <= 65536 codes, else int32."""
    return np.dtype(np.uint16 if codebook_size <= 1 << 16 else np.int32)


def _shard_writer(path: Path) -> ShardWriter:
    """A ShardWriter for exactly one file named ``path`` ('%.0s' formats the index as nothing)."""
    return ShardWriter(str(path).replace("%", "%%") + "%.0s", max_samples=1 << 62)


def _check_inputs(tokenizer_dir: Path, paths: list[str], out_dir: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        if not (tokenizer_dir / name).is_file():
            raise PrecomputeError("--tokenizer", f"{tokenizer_dir}: no {name} (need an EvoTokenizer.save_pretrained "
                                  "directory, e.g. runs/stage1/<name>/export/tokenizer)")
    if not paths:
        raise PrecomputeError("--shards", "the pattern names no shard")
    if out_dir.exists() and not out_dir.is_dir():
        raise PrecomputeError("--out", f"{out_dir} is not a folder")
    names: dict[str, str] = {}
    for p in paths:
        if not os.path.isfile(p):
            raise PrecomputeError("--shards", f"{p}: no such shard")
        if os.path.realpath(os.path.dirname(os.path.abspath(p))) == os.path.realpath(out_dir):
            raise PrecomputeError("--out", f"{out_dir} holds the input shard {p}; choose another folder")
        if Path(p).name in names:
            raise PrecomputeError("--shards", f"{names[Path(p).name]} and {p} have the same file name; "
                                  "outputs are named after their input")
        names[Path(p).name] = p


class _Encoder:
    """Raw sample -> uint8 image (R, R, 3) exactly as the loader crops it; batches -> codes (B, h, w, L)."""

    def __init__(self, tok: EvoTokenizer, device: torch.device, dtype: torch.dtype):
        self.tok, self.device, self.dtype = tok, device, dtype
        res = tok.cfg.encoder.image_size
        self.decoder = ImageTextDecoder(DataConfig(read_json=True, image=ImageConfig(res, "center", flip=False)))
        self.ctx = SampleContext([0])  # unused: a center crop without flip needs no randomness
        self.out_dtype = codes_dtype(tok.cfg.quantizer.codebook_size)

    def image(self, raw: dict) -> np.ndarray:
        if not KEY_RE.match(raw["__key__"]):
            raise SampleError(BAD_KEY, f"key {raw['__key__']!r} must match {KEY_RE.pattern}")
        without_codes = {k: v for k, v in raw.items() if k != CODES_EXT}  # old codes are replaced, not checked
        return self.decoder(without_codes, self.ctx)["image"]  # (R, R, 3) uint8; json checked too

    @torch.no_grad()
    def codes(self, images: list[np.ndarray]) -> np.ndarray:
        x = normalize(torch.from_numpy(np.stack(images)).to(self.device))  # (B, 3, R, R) in [-1, 1]
        codes = self.tok.encode(x.to(self.dtype))  # (B, h, w, L_sem) int64
        return codes.cpu().numpy().astype(self.out_dtype)


def _process_shard(src: str, dst: Path, enc: _Encoder, batch_size: int, pool: ThreadPoolExecutor | None,
                   examples: dict[str, str]) -> dict[str, Any]:
    """Encode one shard into ``dst``; returns its manifest entry (less the tokenizer fields)."""
    t0 = time.perf_counter()
    idx = index_shard(src)
    skipped: Counter = Counter()
    shard_examples: dict[str, str] = {}

    def skip(kind: str, message: str) -> None:
        skipped[kind] += 1
        shard_examples.setdefault(kind, message)
        if kind not in examples:  # the first example of each reason in this run is logged
            examples[kind] = message
            log.warning("precompute_codes: skipped (%s): %s", kind, message)

    for kind, msg in idx.errors:  # tar-level damage: members the index had to drop
        skip(kind, msg)

    def decode(raw: dict) -> np.ndarray | Exception:
        try:
            return enc.image(raw)
        except Exception as e:  # counted below, never silent
            return e
    with open(src, "rb") as f, _shard_writer(dst) as writer:
        for start in range(0, len(idx), batch_size):
            raws = [read_sample(f, idx, i) for i in range(start, min(start + batch_size, len(idx)))]
            results = list(pool.map(decode, raws) if pool else map(decode, raws))
            good = [(raw, img) for raw, img in zip(raws, results) if isinstance(img, np.ndarray)]
            for raw, err in zip(raws, results):
                if isinstance(err, Exception):
                    skip(err.kind if isinstance(err, SampleError) else type(err).__name__,
                         f"{src}:{raw['__key__']}: {err}")
            if good:
                codes = enc.codes([img for _, img in good])  # (B, h, w, L_sem)
                for (raw, _), c in zip(good, codes):
                    sample = {k: v for k, v in raw.items() if k != "__shard__"}
                    writer.write({**sample, CODES_EXT: encode_codes(c)})
    n = writer.total_samples
    if n == 0:  # no shard file at all (an empty tar is unreadable); drop an earlier run's output
        dst.unlink(missing_ok=True)
        log.warning("precompute_codes: %s has no good sample; no output shard written", src)
    return {"source": os.path.abspath(src), "samples": n, "skipped": dict(sorted(skipped.items())),
            "skip_examples": shard_examples, "seconds": round(time.perf_counter() - t0, 3)}


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's share of the shards: the arguments, else ``RANK`` / ``WORLD_SIZE`` (torchrun, DeepSpeed's
    launcher), else 0 / 1."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    rank = rank if rank is not None else int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise PrecomputeError("--rank", f"rank {rank} is not in [0, {world}) (--world_size {world})")
    return rank, world


def _partial_name(rank: int, world: int) -> str:
    return f"{PARTIAL_PREFIX}{rank:05d}-of-{world:05d}.json"


def _merge(out: Path, world: int, keep: dict[str, dict], header: dict) -> bool:
    """Write ``codes_manifest.json`` once every rank's partial manifest of this world is done: ``keep`` (entries of
    the same tokenizer from earlier runs) updated with every rank's shards, in name order, no timings, so the file
    is the same whatever the number of ranks. Returns whether it was written (the last rank to finish writes it;
    two ranks finishing together write the same bytes)."""
    parts = [out / _partial_name(r, world) for r in range(world)]
    loaded = []
    for part in parts:
        try:
            loaded.append(json.loads(part.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return False  # a rank still working (or killed: its re-run finishes the merge)
    if not all(m.get("done") for m in loaded):
        return False
    shards = dict(keep)
    for m in loaded:
        shards.update(m["shards"])
    shards = dict(sorted(shards.items()))
    totals: Counter = Counter()
    for e in shards.values():
        totals.update(e["skipped"])
    atomic_write_json(out / MANIFEST_NAME, {**header, "samples": sum(e["samples"] for e in shards.values()),
                                            "skip_counts": dict(sorted(totals.items())), "shards": shards})
    for part in out.glob(PARTIAL_PREFIX + "*.json"):  # this world's, and a killed run's of another world
        part.unlink(missing_ok=True)
    return True


def precompute(tokenizer_dir: str | os.PathLike, shards: str | Sequence[str], out_dir: str | os.PathLike,
               batch_size: int = 64, device: str = "cpu", overwrite: bool = False, *, dtype: str = "auto",
               workers: int = 0, progress: bool = False, rank: int | None = None,
               world_size: int | None = None) -> dict[str, Any]:
    """Write ``out_dir/<shard name>`` with codes for this rank's shards of ``shards`` (a loader pattern or a list).

    Rank ``r`` of ``world_size`` (:func:`rank_world`) encodes shards ``r, r + world_size, ...``; each shard's
    output depends on that shard alone, so the files are the same for any number of ranks. A rank records the
    shards it finished in its partial manifest after every shard (a killed rank's re-run skips them); the last
    rank to finish merges the partials into ``codes_manifest.json``. Returns this rank's summary: samples, skip
    counts and first examples, written and resumed shards, seconds (total), load_seconds (tokenizer), images/s
    (after loading), the manifest path and whether this rank wrote it. Raises :class:`PrecomputeError` on
    unusable arguments or an unreadable shard.
    """
    t0 = time.perf_counter()
    tok_dir, out = Path(tokenizer_dir), Path(out_dir)
    paths = expand_shards(shards) if isinstance(shards, str) else [str(p) for p in shards]
    _check_inputs(tok_dir, paths, out)
    rank, world = rank_world(rank, world_size)
    if batch_size < 1 or workers < 0 or dtype not in DTYPES:
        raise PrecomputeError("--batch_size", f"need --batch_size >= 1, --workers >= 0, --dtype in {tuple(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise PrecomputeError("--device", f"{device} requested but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank on a node
    if dtype == "auto":  # the project's rule for inference: bf16 on a CUDA device that has it, else float32
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[resolve_eval_precision("auto", device)[0]]
    from tokenizer.model import EvoTokenizer  # here, not at import: manifest readers need no transformers

    try:
        fingerprint = tokenizer_fingerprint(tok_dir)
    except ValueError as e:
        raise PrecomputeError("tokenizer", str(e)) from None
    dtype_name = str(DTYPES[dtype]).removeprefix("torch.")
    tok = EvoTokenizer.from_pretrained(tok_dir, with_teacher=False, device=device)
    tok = tok.to(DTYPES[dtype]).eval().requires_grad_(False)  # the quantiser's codebooks stay float32
    enc = _Encoder(tok, torch.device(device), DTYPES[dtype])
    t_loaded = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}  # shard name -> entry, made by this tokenizer and dtype (merged or partial)
    for path in [out / MANIFEST_NAME, *sorted(out.glob(PARTIAL_PREFIX + "*.json"))]:
        try:
            old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError as e:
            log.warning("precompute_codes: unreadable %s (%s): its shards are redone", path, e)
            old = {}
        for name, e in old.get("shards", {}).items():
            if e.get("tokenizer_sha256") == fingerprint and e.get("dtype") == dtype_name:
                done[name] = e
            elif (out / name).exists() and name not in done:
                log.warning("precompute_codes: %s was made by another tokenizer or dtype: redone if in --shards, "
                            "else now unlisted (stale)", out / name)
    g = tok.encoder.grid_size
    header = {
        "version": MANIFEST_VERSION, "tokenizer": str(tok_dir.resolve()), "tokenizer_sha256": fingerprint,
        "grid": [g, g], "depth": tok.cfg.quantizer.depth_sem, "codebook_size": tok.cfg.quantizer.codebook_size,
        "resolution": tok.cfg.encoder.image_size, "codes_dtype": str(enc.out_dtype), "dtype": dtype_name,
        "device": torch.device(device).type,
    }
    mine = paths[rank::world]
    names = {Path(p).name for p in mine}
    keep = {n: e for n, e in done.items() if n not in names or (not overwrite and (out / n).exists())}
    entries = {n: e for n, e in keep.items() if n in names}  # this rank's finished shards
    partial = out / _partial_name(rank, world)
    summary: dict[str, Any] = {"samples": 0, "skip_counts": {}, "skip_examples": {}, "written": [], "resumed": [],
                               "manifest": str(out / MANIFEST_NAME), "rank": rank, "world_size": world}
    skips: Counter = Counter()

    def save(finished: bool) -> None:  # after every shard: the partial lists exactly this rank's finished shards
        atomic_write_json(partial, {**header, "done": finished, "shards": dict(sorted(entries.items()))})

    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        for src in progress_bar(mine, enabled=progress, unit="shard", desc="precompute_codes"):
            name, dst = Path(src).name, out / Path(src).name
            if name in entries:
                summary["resumed"].append(str(dst))
                continue
            try:
                entry = _process_shard(src, dst, enc, batch_size, pool, summary["skip_examples"])
            except ShardError as e:
                raise PrecomputeError("--shards", str(e)) from None
            entry.pop("seconds")  # timings go to the summary, never into the manifest
            entries[name] = {**entry, "tokenizer_sha256": fingerprint, "dtype": dtype_name}
            summary["samples"] += entry["samples"]
            skips.update(entry["skipped"])
            summary["written"] += [str(dst)] if entry["samples"] else []
            save(False)
    finally:
        if pool:
            pool.shutdown()
    save(True)
    summary["merged"] = _merge(out, world, {n: e for n, e in keep.items() if n not in names}, header)
    now = time.perf_counter()
    summary.update(seconds=now - t0, load_seconds=t_loaded - t0, skip_counts=dict(sorted(skips.items())),
                   images_per_s=summary["samples"] / max(now - t_loaded, 1e-9))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"encoded {s['samples']} samples into {len(s['written'])} shards in {s['seconds']:.1f} s "
             f"(tokenizer load {s['load_seconds']:.1f} s, then {s['images_per_s']:.1f} images/s); "
             f"{len(s['resumed'])} shards already done (resumed)"]
    n_skipped = sum(s["skip_counts"].values())
    lines.append(f"skipped {n_skipped}" + (":" if n_skipped else ""))
    for kind, n in s["skip_counts"].items():
        lines.append(f"  {kind}: {n}  e.g. {s['skip_examples'].get(kind, '')}")
    lines.append(f"manifest: {s['manifest']}" if s.get("merged", True) else
                 f"rank {s['rank']} of {s['world_size']} done; the last rank to finish writes {s['manifest']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = FlagParser(prog="python -m unimllm.stages.precompute_codes", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="EvoTokenizer.save_pretrained directory")
    p.add_argument("--shards", required=True, help="brace pattern(s) joined by '::', as the loader accepts")
    p.add_argument("--out", required=True, help="output folder (shards keep their input file names)")
    p.add_argument("--batch_size", type=int, default=64, help="images per tokenizer.encode call")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="encoder compute dtype; auto = bfloat16 on a CUDA device that has it, else float32")
    p.add_argument("--rank", type=int, default=None, help="this process's share (default: $RANK, else 0)")
    p.add_argument("--world_size", type=int, default=None, help="number of shares (default: $WORLD_SIZE, else 1)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding threads (0: decode in the main thread)")
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        summary = precompute(args.tokenizer, args.shards, args.out, args.batch_size, args.device, args.overwrite,
                             dtype=args.dtype, workers=args.workers, progress=True, rank=args.rank,
                             world_size=args.world_size)
    except PrecomputeError as e:
        print(f"precompute_codes: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"precompute_codes: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("precompute_codes: interrupted; finished shards are complete, the open one was removed", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
