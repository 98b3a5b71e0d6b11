"""Write a shapes-world dataset: train/val shards, a shapes-GenEval prompt file, a shapes-MME set.

``python -m data.shapes --out DIR --n N [--level demo|full] [--n_val M] [--seed S] [--image_size PX]
[--config FILE] [--world.<field> VALUE ...]`` writes (docs/shapes.md)::

    DIR/train/shapes-train-%06d.tar      samples 0..N-1 of split train (seed stream (S, 0, i))
    DIR/val/shapes-val-%06d.tar          samples 0..M-1 of split val   (seed stream (S, 1, i))
    DIR/val/geneval_prompts.jsonl        GenEval-format prompts, geneval_per_tag per tag
    DIR/val/mme/<subtask>.txt            MME eval_tool lines: image_name<TAB>question<TAB>answer
    DIR/val/mme/<subtask>/<image_name>   the val images those lines ask about
    DIR/manifest.json                    resolved config, counts, seeds, files

Rendering runs in a process pool; samples are written in index order, so the bytes do not depend
on the worker count. ``manifest.json`` is written last: it marks a complete dataset. Re-running into
the same DIR first validates the config, then removes the files this writer owns there, the manifest
first (so a re-run that fails midway leaves no manifest, never one that lists missing files).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from data.shapes import render_sample
from data.shapes_config import SPLITS, TAGS, ShapesConfig, preset
from data.shapes_text import sample_geneval_spec
from data.shard_writer import ShardWriter
from unimllm.command_line import exit_with, help_text, pop_no_progress, split_config_arg
from unimllm.config import CLI_SOURCE, ConfigError, load_config, parse_overrides, read_yaml, to_dict, validate
from unimllm.files import atomic_write

MME_SUBTASKS = ("existence", "count", "position", "color")
ALIASES = {"image_size": "world.image_size"}  # CLI shortcuts for nested keys


@dataclass
class DatasetConfig:
    """What ``python -m data.shapes`` writes; ``world`` starts from the ``level`` preset."""

    out: str = ""
    "Output directory."
    n: int = 1000
    "Number of train samples."
    n_val: int = 200
    "Number of val samples (also the images of the shapes-MME set)."
    seed: int = 0
    "Dataset seed (>= 0); sample i of a split is rendered from an RNG seeded by (seed, split id, i)."
    level: Literal["demo", "full"] = "demo"
    "Difficulty preset the world config starts from (see data.shapes.preset)."
    shard_size: int = 1000
    "Samples per tar shard."
    workers: int = 0
    "Rendering processes (0 = all CPU cores, 1 = in-process)."
    geneval_per_tag: int = 50
    "Prompts per GenEval tag in val/geneval_prompts.jsonl (unique where the tag has enough)."
    world: ShapesConfig = field(default_factory=ShapesConfig)
    "The shapes-world difficulty (data.shapes.ShapesConfig)."

    def validate(self) -> None:
        for key in ("n", "n_val", "seed", "workers", "geneval_per_tag"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if self.shard_size <= 0:
            raise ConfigError("shard_size", "must be > 0")
        if not self.out:
            raise ConfigError("out", "an output directory is required (--out DIR)")


# ----------------------------------------------------------------------------- prompts


def geneval_prompts(world: ShapesConfig, per_tag: int, seed: int = 0) -> list[dict]:
    """``per_tag`` GenEval-format prompts for every tag with a positive weight, in TAGS order.

    Prompts are unique within a tag while the tag has enough distinct ones (single_object has only
    len(shapes)); after that its unique prompts are cycled, so every tag keeps the same weight.
    """
    out = []
    for t, tag in enumerate(TAGS):
        if world.tag_weights.get(tag, 0) <= 0:
            continue
        rng = np.random.default_rng([int(seed), SPLITS["geneval"], t])
        unique: dict[str, dict] = {}
        for _ in range(20 * per_tag):
            if len(unique) >= per_tag:
                break
            meta, _ = sample_geneval_spec(world, rng, tag)
            unique.setdefault(meta["prompt"], meta)
        metas = list(unique.values())
        out += [metas[i % len(metas)] for i in range(per_tag)] if metas else []
    return out


# ----------------------------------------------------------------------------- writing


def _clean(out: Path) -> None:
    """Remove the files a previous run of this writer left (and nothing else).

    ``manifest.json`` goes first: it is written last, so it marks a complete dataset; a run that fails
    after this point leaves no manifest rather than one listing shards that no longer exist.
    """
    for name in ("manifest.json", "val/geneval_prompts.jsonl"):
        for p in (out / name, (out / name).with_name(f".tmp-{Path(name).name}")):
            p.unlink(missing_ok=True)
    for split in ("train", "val"):
        for p in (out / split).glob(f"shapes-{split}-*.tar*"):
            p.unlink()
    if (out / "val" / "mme").is_dir():
        shutil.rmtree(out / "val" / "mme")


def _write_split(cfg: DatasetConfig, split: str, n: int, pool, on_sample: Callable[[dict], None]) -> list[str]:
    pattern = Path(cfg.out) / split / f"shapes-{split}-%06d.tar"
    work = partial(render_sample, cfg.world, split, seed=cfg.seed)
    samples = pool.imap(work, range(n), chunksize=32) if pool else map(work, range(n))
    with ShardWriter(pattern, max_samples=cfg.shard_size) as writer:
        for sample in samples:  # imap keeps index order whatever the worker count
            writer.write(sample)
            on_sample(sample)
    return writer.written


def write_dataset(cfg: DatasetConfig, log: Callable[[str], None] = print) -> dict:
    """Write everything listed in the module docstring; returns the manifest (also in manifest.json)."""
    validate(cfg)  # callers may build DatasetConfig in code
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    t0 = time.time()
    tags: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    mme_lines: dict[str, list[str]] = {s: [] for s in MME_SUBTASKS}
    mme_dir = out / "val" / "mme"

    def count_train(sample: dict) -> None:
        tags["train"][json.loads(sample["json"])["geneval"]["tag"]] += 1

    def collect_val(sample: dict) -> None:
        record = json.loads(sample["json"])
        tags["val"][record["geneval"]["tag"]] += 1
        name = f"{sample['__key__']}.png"
        for subtask, pair in record["mme"].items():
            atomic_write(mme_dir / subtask / name, sample["png"])
            mme_lines[subtask] += [f"{name}\t{q['question']}\t{q['answer']}" for q in pair]

    workers = cfg.workers or os.cpu_count() or 1
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        train = _write_split(cfg, "train", cfg.n, pool, count_train)
        log(f"train: {cfg.n} samples, {len(train)} shards ({time.time() - t0:.1f}s)")
        val = _write_split(cfg, "val", cfg.n_val, pool, collect_val)
        log(f"val: {cfg.n_val} samples, {len(val)} shards ({time.time() - t0:.1f}s)")
    finally:
        if pool:
            pool.close()
            pool.join()
    for subtask, lines in mme_lines.items():
        if lines:
            atomic_write(mme_dir / f"{subtask}.txt", ("\n".join(lines) + "\n").encode())
    prompts = geneval_prompts(cfg.world, cfg.geneval_per_tag, cfg.seed)
    atomic_write(out / "val" / "geneval_prompts.jsonl", "".join(json.dumps(m) + "\n" for m in prompts).encode())
    manifest = {
        "world": "shapes",
        "level": cfg.level,
        "config": to_dict(cfg),
        "seeds": {split: [cfg.seed, sid] for split, sid in SPLITS.items()},
        "counts": {
            "train": cfg.n,
            "val": cfg.n_val,
            "tags": {k: dict(sorted(v.items())) for k, v in tags.items()},
            "geneval_prompts": dict(Counter(m["tag"] for m in prompts)),
            "geneval_unique_prompts": dict(Counter(m["tag"] for m in {m["prompt"]: m for m in prompts}.values())),
            "mme_images": {s: len(lines) // 2 for s, lines in mme_lines.items()},
        },
        "files": {
            "train": [str(Path(p).relative_to(out)) for p in train],
            "val": [str(Path(p).relative_to(out)) for p in val],
            "geneval_prompts": "val/geneval_prompts.jsonl",
            "mme": {s: f"val/mme/{s}.txt" for s, lines in mme_lines.items() if lines},
        },
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"wrote {out} in {manifest['seconds']}s")
    return manifest


# ----------------------------------------------------------------------------- command line


def _normalize(argv: Sequence[str]) -> list[str]:
    """``--n_val`` -> ``--n_val``, ``--image_size`` -> ``--world.image_size``."""
    out = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            key, eq, val = tok[2:].partition("=")
            key = key.replace("-", "_")
            out.append("--" + ALIASES.get(key, key) + eq + val)
        else:
            out.append(tok)
    return out


def load(argv: Sequence[str]) -> DatasetConfig:
    """Preset of ``level`` <- YAML ``--config`` <- dotted CLI overrides, validated once."""
    path, rest = split_config_arg(_normalize(argv))
    data = read_yaml(path) if path else {}
    from_cli = [v for k, v in parse_overrides(rest) if k == "level"]
    level, source = (from_cli[-1], CLI_SOURCE) if from_cli else (data.get("level", "demo"), str(path))
    if level not in ("demo", "full"):
        raise ConfigError("level", f"expected one of 'demo', 'full', got {level!r}", source)
    return load_config(DatasetConfig, path, rest, defaults={"level": level, "world": to_dict(preset(level))})


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(DatasetConfig))
        print("Shortcuts: --n_val, --image_size (= --world.image_size); --level picks the world preset.")
        raise SystemExit(0)
    try:
        cfg = load(pop_no_progress(argv))
    except ConfigError as e:
        exit_with(e)
    return write_dataset(cfg)


if __name__ == "__main__":
    main()
