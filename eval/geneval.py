"""GenEval harness: prompts, the official image layout, the official scorer hook and its summary.

The layout, results format and summary rule are those of djghosh13/geneval (MIT), re-implemented here:

- generation writes ``<out>/<index:05d>/metadata.jsonl`` (the prompt's metadata line) and
  ``<out>/<index:05d>/samples/<j:04d>.png`` (:func:`generate_layout`);
- the real scorer is the official ``evaluation/evaluate_images.py`` run in its own environment
  (:func:`scorer_command`, :func:`run_scorer`; set-up in docs/geneval.md); it writes one JSON line per
  image with ``filename, tag, prompt, correct, reason, metadata, details``;
- :func:`summarize_results` computes ``evaluation/summary_scores.py``'s task scores and overall score;
- :func:`score_shapes_layout` scores a shapes-world layout with :mod:`eval.shapes_scorer` into the same
  results format (plus a shuffled-prompt control), so both scorers share one summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eval.geneval_shapes import TAGS, shuffled_partner
from unimllm.files import atomic_path, atomic_write, atomic_write_json
from unimllm.logging import progress_bar

FORMAT = "geneval-layout/1"
OFFICIAL_PROMPTS = Path(__file__).parent / "assets" / "geneval" / "evaluation_metadata.jsonl"
MANIFEST = "manifest.json"
SEED_RULE = "sample j of prompt i: int(numpy.random.SeedSequence([seed, i, j]).generate_state(1)[0]) (uint32)"
RESULT_KEYS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
DEFAULT_DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
# keys evaluate_images.py reads from --options (anything else it silently ignores)
SCORER_OPTIONS = ("model", "clip_model", "threshold", "counting_threshold", "max_objects", "max_overlap",
                  "position_threshold", "bgcolor", "crop")
_IMAGE_NAME = re.compile(r"\d+\.png")  # evaluate_images.py: re.match, so a prefix match; temp names start with "."

GenerateFn = Callable[[list[str], list[int]], list[np.ndarray]]


# ----------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[dict]:
    """GenEval metadata JSONL -> one dict per line (line order = prompt index); ValueError names file:line."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as fp:
        for n, line in enumerate(fp, 1):
            where = f"{path}:{n}"
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
            for key, kind in (("tag", str), ("prompt", str), ("include", list)):
                if not isinstance(meta.get(key), kind):
                    raise ValueError(f"{where}: missing or non-{kind.__name__} {key!r}")
            for clause in meta["include"] + meta.get("exclude", []):
                if not (isinstance(clause, dict) and "class" in clause and isinstance(clause.get("count"), int)):
                    raise ValueError(f"{where}: include/exclude clauses need 'class' and an integer 'count'")
            out.append(meta)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _prompts_sha256(prompts: list[dict]) -> str:
    """sha256 of the prompts as JSONL (``json.dumps`` per line); equals the official file's own sha256."""
    return hashlib.sha256("".join(json.dumps(m) + "\n" for m in prompts).encode()).hexdigest()


# ----------------------------------------------------------------------------- generation layout


def sample_seed(seed: int, index: int, j: int) -> int:
    """Seed of sample ``j`` of prompt ``index`` (:data:`SEED_RULE`); independent of batch and world size."""
    return int(np.random.SeedSequence([int(seed), int(index), int(j)]).generate_state(1)[0])


def _complete(folder: Path, meta: dict, n_samples: int) -> bool:
    try:
        if json.loads((folder / "metadata.jsonl").read_text()) != meta:
            return False
    except (OSError, ValueError):
        return False
    return all((folder / "samples" / f"{j:04d}.png").is_file() for j in range(n_samples))


def _check_manifest(out: Path, manifest: dict) -> None:
    """Refuse to resume into a folder written with other settings (mixing them would corrupt the scores)."""
    path = out / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(manifest) if k != "prompts_file" and old.get(k) != manifest.get(k))
    if diff:
        raise ValueError(f"{path} was written with other settings ({', '.join(diff)}); use a new output folder")


def generate_layout(out_dir: str | Path, prompts: str | Path | list[dict], generate_fn: GenerateFn, *,
                    n_samples: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1, batch: int = 4,
                    manifest: dict | None = None) -> dict:
    """Write GenEval's layout for this rank's prompts (``index % world_size == rank``); resumable.

    ``generate_fn(prompt_texts, seeds)`` returns one uint8 (H, W, 3) array per entry, at most ``batch``
    per call; the seed of each image is :func:`sample_seed` ``(seed, index, j)``. A prompt whose folder
    already holds its metadata and all ``n_samples`` samples is skipped; any other is (re)done whole:
    its metadata.jsonl is removed first and written last, every file through a temp name and a rename (unimllm.files).
    Rank 0 writes ``<out>/manifest.json`` (format, seed rule, prompts sha256, ``manifest`` = sampler
    settings); every rank refuses a folder whose manifest has other settings. Returns counts
    ``{"prompts", "skipped", "generated", "images"}`` for this rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n_samples < 1 or batch < 1:
        raise ValueError(f"n_samples and batch must be >= 1, got {n_samples}, {batch}")
    source = None
    if isinstance(prompts, (str, Path)):
        source, prompts = str(prompts), read_prompts(prompts)
    out = Path(out_dir)
    info = json.loads(json.dumps({
        "format": FORMAT, "layout": "<index:05d>/metadata.jsonl, <index:05d>/samples/<j:04d>.png",
        "n_prompts": len(prompts), "prompts_sha256": _prompts_sha256(prompts), "prompts_file": source,
        "n_samples": n_samples, "seed": seed, "seed_rule": SEED_RULE, "sampler": manifest or {},
    }))  # round trip: tuples -> lists, so it compares equal to what is read back
    _check_manifest(out, info)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_json(out / MANIFEST, info)

    mine = range(rank, len(prompts), world_size)
    todo = [i for i in mine if not _complete(out / f"{i:05d}", prompts[i], n_samples)]
    for i in todo:  # mark incomplete before touching samples; clear a crashed run's temp files
        folder = out / f"{i:05d}"
        (folder / "metadata.jsonl").unlink(missing_ok=True)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for tmp in [*folder.glob(".tmp-*"), *(folder / "samples").glob(".tmp-*")]:
            tmp.unlink()
    jobs = [(i, j) for i in todo for j in range(n_samples)]
    left = dict.fromkeys(todo, n_samples)
    for start in progress_bar(range(0, len(jobs), batch), desc="generate", unit="batch", main=rank == 0):
        chunk = jobs[start:start + batch]
        images = generate_fn([prompts[i]["prompt"] for i, _ in chunk], [sample_seed(seed, i, j) for i, j in chunk])
        if len(images) != len(chunk):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(chunk)} prompts")
        for (i, j), img in zip(chunk, images):
            arr = np.asarray(img)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"generate_fn must return uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
            folder = out / f"{i:05d}"
            with atomic_path(folder / "samples" / f"{j:04d}.png") as p:  # .tmp-*: never matches \d+\.png
                Image.fromarray(arr).save(p, format="PNG")
            left[i] -= 1
            if left[i] == 0:  # metadata last: its presence means the folder is complete
                text = json.dumps(prompts[i]) + "\n"
                atomic_write(folder / "metadata.jsonl", text)
    return {"prompts": len(mine), "skipped": len(mine) - len(todo), "generated": len(todo), "images": len(jobs)}


# ----------------------------------------------------------------------------- official scorer


def scorer_command(python: str | Path, geneval_dir: str | Path, image_dir: str | Path, outfile: str | Path,
                   model_path: str | Path, options: dict[str, Any] | None = None,
                   model_config: str | Path | None = None) -> list[str]:
    """argv of the official ``evaluation/evaluate_images.py`` (README's command; ``--options k=v ...`` last)."""
    options = dict(options or {})
    bad = [k for k in options if k not in SCORER_OPTIONS]
    if bad:
        raise ValueError(f"unknown evaluate_images.py options {bad}; it reads {list(SCORER_OPTIONS)}")
    argv = [str(python), str(Path(geneval_dir) / "evaluation" / "evaluate_images.py"), str(image_dir),
            "--outfile", str(outfile), "--model-path", str(model_path)]
    if model_config is not None:
        argv += ["--model-config", str(model_config)]
    if options:
        argv += ["--options", *(f"{k}={v}" for k, v in options.items())]
    return argv


def run_scorer(python: str | Path, geneval_dir: str | Path, image_dir: str | Path, outfile: str | Path,
               model_path: str | Path, options: dict[str, Any] | None = None,
               model_config: str | Path | None = None, env: dict[str, str] | None = None) -> dict:
    """Run the official scorer (no shell) on a finished layout, then :func:`summarize_results` its output.

    FileNotFoundError when evaluate_images.py, the detector checkpoint ``<model_path>/<model>.pth`` or
    the image folder is missing; RuntimeError (with the tail of its output) when the scorer fails.
    """
    script = Path(geneval_dir) / "evaluation" / "evaluate_images.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: geneval_dir must be a checkout of djghosh13/geneval")
    ckpt = Path(model_path) / f"{(options or {}).get('model', DEFAULT_DETECTOR)}.pth"
    if not ckpt.is_file():
        raise FileNotFoundError(f"detector checkpoint {ckpt} not found (evaluation/download_models.sh "
                                f"{model_path}; see docs/geneval.md)")
    if not Path(image_dir).is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found")
    argv = scorer_command(python, geneval_dir, image_dir, outfile, model_path, options, model_config)
    res = subprocess.run(argv, cwd=geneval_dir, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}")
    return summarize_results(outfile)


# ----------------------------------------------------------------------------- summary


def summarize_results(results_jsonl: str | Path) -> dict:
    """The scores of GenEval's ``evaluation/summary_scores.py`` from a results JSONL.

    Official rule (summary_scores.py): ``for tag, task_df in df.groupby('tag', sort=False):
    task_scores.append(task_df['correct'].mean())`` then ``np.mean(task_scores)``. So a task score is
    the fraction of correct IMAGES of that tag (no per-prompt averaging first; the same when every prompt
    has equally many samples), and ``overall`` is the unweighted mean over the tags present. Prompts are
    counted as distinct ``metadata`` strings (``df.groupby('metadata')``), as it does.

    Returns ``{"tags": {tag: score} (first-appearance order), "overall", "n_images", "n_prompts",
    "counts": {tag: [n_correct, n_images]}, "image_accuracy", "prompt_any_correct"`` (its "% correct
    prompts": a prompt counts when any of its images is correct) ``, "missing_tags"`` (of the six
    GenEval tags; overall is then not comparable to published numbers)``}``.
    """
    path = Path(results_jsonl)
    counts: dict[str, list[int]] = {}
    prompts: dict[str, bool] = {}
    n_images = 0
    with open(path, encoding="utf-8") as fp:
        for n, line in enumerate(fp, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if not (isinstance(row, dict) and isinstance(row.get("tag"), str) and isinstance(row.get("correct"), bool)
                    and "metadata" in row):
                raise ValueError(f"{path}:{n}: need 'tag' (str), 'correct' (bool) and 'metadata'")
            c = counts.setdefault(row["tag"], [0, 0])
            c[0] += row["correct"]
            c[1] += 1
            key = row["metadata"] if isinstance(row["metadata"], str) else json.dumps(row["metadata"])
            prompts[key] = prompts.get(key, False) or row["correct"]
            n_images += 1
    if not n_images:
        raise ValueError(f"{path}: no results")
    tags = {t: k / total for t, (k, total) in counts.items()}
    return {
        "tags": tags,
        "overall": float(np.mean(list(tags.values()))),
        "n_images": n_images,
        "n_prompts": len(prompts),
        "counts": {t: list(c) for t, c in counts.items()},
        "image_accuracy": sum(k for k, _ in counts.values()) / n_images,
        "prompt_any_correct": sum(prompts.values()) / len(prompts),
        "missing_tags": [t for t in TAGS if t not in counts],
    }


# ----------------------------------------------------------------------------- shapes-world scorer


def read_layout(image_dir: str | Path) -> list[tuple[dict, list[str]]]:
    """``(metadata, image paths)`` per prompt folder, walked as evaluate_images.py does (digit folders,
    ``\\d+\\.png`` samples), sorted by index; a digit folder without metadata.jsonl is an error."""
    out = []
    for sub in sorted(os.listdir(image_dir)):
        folder = os.path.join(image_dir, sub)
        if not (os.path.isdir(folder) and sub.isdigit()):
            continue
        meta_path = os.path.join(folder, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} missing: the layout is incomplete (rerun generate_layout)")
        with open(meta_path) as fp:
            meta = json.load(fp)
        samples = os.path.join(folder, "samples")
        names = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
        paths = [os.path.join(samples, m) for m in names if _IMAGE_NAME.match(m)]
        out.append((meta, [p for p in paths if os.path.isfile(p)]))
    return out


def _result(filename: str, meta: dict, correct: bool, reason: str, detections: dict) -> dict:
    details = {cls: [[*d.bbox, d.confidence] for d in ds] for cls, ds in detections.items()}
    return dict(zip(RESULT_KEYS, (filename, meta["tag"], meta["prompt"], bool(correct), reason,
                                  json.dumps(meta), json.dumps(details))))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def score_shapes_layout(image_dir: str | Path, out_jsonl: str | Path, *, seed: int = 0,
                        control_jsonl: str | Path | None = None, cfg: Any = None) -> tuple[dict, dict]:
    """Score a shapes-world layout into the official results format; ``(report, control_report)``.

    Each image is scored by :mod:`eval.shapes_scorer` (``score`` = ``evaluate(detect(...))``; detected
    once, evaluated twice) against its own metadata (``out_jsonl``) and against the metadata of a
    shuffled prompt of the same tag (:func:`eval.geneval_shapes.shuffled_partner` over the prompt folders,
    ``seed``) in ``control_jsonl`` (default ``<out stem>_shuffled.jsonl``); both go through
    :func:`summarize_results`. ``details`` holds ``[x0, y0, x1, y1, confidence]`` per detection, as
    evaluate_images.py's does. ``cfg``: an optional ``eval.shapes_scorer.ScorerConfig``.
    """
    from eval.shapes_scorer import ScorerConfig, detect, evaluate

    cfg = cfg or ScorerConfig()
    out = Path(out_jsonl)
    control = Path(control_jsonl) if control_jsonl else out.with_name(f"{out.stem}_shuffled{out.suffix}")
    layout = read_layout(image_dir)
    if not layout:
        raise FileNotFoundError(f"{image_dir}: no prompt folders")
    partner = shuffled_partner([m for m, _ in layout], seed)
    rows, ctrl = [], []
    for k, (meta, paths) in enumerate(layout):
        other = layout[partner[k]][0]
        for p in paths:
            dets = detect(p, cfg)
            rows.append(_result(p, meta, *evaluate(dets, meta, cfg.position_threshold), dets))
            ctrl.append(_result(p, other, *evaluate(dets, other, cfg.position_threshold), dets))
    _write_jsonl(out, rows)
    _write_jsonl(control, ctrl)
    return summarize_results(out), summarize_results(control)
