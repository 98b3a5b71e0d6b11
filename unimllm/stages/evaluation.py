"""The evaluation suites behind ``launch/evaluate.py``: resolve the checkpoint, run one suite, pin and report.

Suites (``EvalConfig.suite``):

- ``recon``: :func:`unimllm.stages.reconstruction.evaluate_reconstruction` of the tokenizer (a stage-1 export, or the one a
  unified export references) over ``recon.source``;
- ``mme`` / ``pope``: greedy replies of the unified model, scored by :mod:`eval.mme` / :mod:`eval.pope`;
- ``geneval``: images into GenEval's layout (:func:`eval.geneval.generate_layout`, resumable), then the
  official scorer when configured, else the command that scores it;
- ``shapes``: recon on ``shapes.shards`` with the unified model's tokenizer, shapes-MME on the same shards, and
  shapes-GenEval on ``shapes.geneval_prompts`` scored by :func:`eval.geneval.score_shapes_layout` (the six
  tags + overall, and a shuffled-prompt control: the same images against another prompt of their tag).

Outputs in the run folder (rank 0): ``settings.json``, ``scores.json``, ``report.md`` (:mod:`eval.report`),
``metrics.jsonl`` + ``images/`` (+ ``wandb/``) from the logger, ``recon_grid.png``, ``mme/`` (eval_tool
results + replies.jsonl), ``pope/answers.jsonl``, ``geneval/`` (the layout + manifest.json),
``geneval_results.jsonl`` (+ ``geneval_results_shuffled.jsonl`` for shapes) and ``geneval_grid.png``.

Ranks: questions are split ``index % world == rank`` (replies gathered), GenEval prompts likewise
(generate_layout), reconstruction by eval.recon's file/shard split with summed statistics; rank 0 scores and
writes. Every rank must call :func:`run` (collectives).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from eval.config import EvalConfig
from eval.report import evaluator_versions, git_state, hash_files, sha256_file, tree_identity, write_report
from unimllm.config import to_dict
from unimllm.distributed import DistInfo, barrier, broadcast_object, gather_objects
from unimllm.logging import build_logger, print0, progress_bar
from unimllm.precision import resolve_eval_precision

if TYPE_CHECKING:
    from unimllm.stages.artifacts import ResolvedTokenizer

GENERATOR = ("image with sample seed s: torch.Generator('cpu').manual_seed(s) draws every code of that image in "
             "llm.sampling.sample_codes (one generator per image: codes independent of batch and ranks; the batched "
             "pixel decode may round a few pixels differently by 1)")
CONTROL = ("each image also scored against the prompt of another folder with the same tag "
           "(eval.geneval_shapes.shuffled_partner(seed)): the chance level of these images")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADLINE = ("eval/recon/psnr", "eval/recon/ssim", "eval/recon/rfid", "eval/mme/total", "eval/shapes_mme/total",
            "eval/pope/mean/f1", "eval/geneval/overall", "eval/geneval/generation/images",
            "eval/shapes_geneval/overall", "eval/shapes_geneval/ratio")


# ----------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: ``kind`` unified (stage-2 export) or tokenizer (stage-1 export)."""

    kind: str
    path: Path
    tokenizer: ResolvedTokenizer
    """The tokenizer (the export itself for kind tokenizer) and its sha256, computed once at resolution."""


def resolve_checkpoint(ckpt: str | Path, suite: str, tokenizer: str = "") -> Checkpoint:
    """A unified export / stage-2 or 3 run folder, or (suite recon only) a tokenizer export / stage-1 run folder
    (:mod:`unimllm.stages.artifacts`; errors name ``ckpt``)."""
    from unimllm.stages.artifacts import (
        TOKENIZER,
        UNIFIED,
        ResolvedTokenizer,
        export_of,
        resolve_tokenizer,
        tokenizer_fingerprint,
        unified_export,
    )

    command = f"ckpt (suite {suite})"
    a = export_of(ckpt, command, (UNIFIED, TOKENIZER) if suite == "recon" else (UNIFIED,))
    if a.kind == UNIFIED:
        path = unified_export(a.path, command)
        return Checkpoint("unified", path, resolve_tokenizer(path, tokenizer or None, field="tokenizer"))
    return Checkpoint("tokenizer", a.path, ResolvedTokenizer(a.path, tokenizer_fingerprint(a.path)))


def output_dir(cfg: EvalConfig, ckpt: Checkpoint) -> Path:
    """``cfg.out``, else ``<run>/eval/<suite>`` for ``<run>/export/<name>``, else ``<ckpt>/../eval/<suite>``."""
    if cfg.out:
        return Path(cfg.out)
    parent = ckpt.path.resolve().parent
    return (parent.parent if parent.name == "export" else parent) / "eval" / cfg.suite


# ----------------------------------------------------------------------------- the run


class Run:
    """One evaluation: the model (loaded lazily), and what it pins (files read, settings, grids, timings)."""

    def __init__(self, cfg: EvalConfig, dist: DistInfo, ckpt: Checkpoint, out: Path):
        self.cfg, self.dist, self.ckpt, self.out = cfg, dist, ckpt, out
        self.files: list[str] = []
        self.settings: dict[str, Any] = {}
        self.images: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self.identity: dict = {}
        self.precision_reason = ""
        self._pipe = None

    def read(self, *paths: str | Path) -> None:
        """Record data files read (their sha256 goes into settings.json)."""
        self.files += [str(p) for p in paths if p]

    def pipeline(self):
        from unimllm.stages.pipeline import UnifiedPipeline

        if self._pipe is None:
            self._pipe = UnifiedPipeline.from_pretrained(self.ckpt.path, tokenizer_dir=self.ckpt.tokenizer,
                                                         device=self.dist.device, dtype=DTYPES[self.cfg.precision])
        return self._pipe

    def tokenizer(self):
        from tokenizer.model import EvoTokenizer

        if self.ckpt.kind == "unified" and self.cfg.suite != "recon":
            return self.pipeline().tokenizer
        return EvoTokenizer.from_pretrained(self.ckpt.tokenizer.path, with_teacher=False, device=self.dist.device)

    def sampler(self):
        """The checkpoint's sampler defaults with the geneval section's overrides (what is actually used)."""
        g = self.cfg.geneval
        over = {"cfg_scale": g.cfg_scale, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p}
        sampler = dataclasses.replace(self.pipeline().sampler, **{k: v for k, v in over.items() if v is not None})
        sampler.validate()
        return sampler

    def timed(self, key: str, fn: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        out = fn()
        self.timings[key] = round(time.perf_counter() - t0, 3)
        print0(f"eval: {key} done in {self.timings[key]:.1f} s", is_main=self.dist.is_main)
        return out

    def pinned(self, argv: Sequence[str] | None) -> dict:
        """settings.json: config, checkpoint, sampler, seeds, data hashes, evaluator versions, timings."""
        cfg = self.cfg
        evaluators = {**evaluator_versions(), "scorer": self.settings.pop("scorer", None)}
        return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": list(argv or []),
                "suite": cfg.suite, "config": to_dict(cfg), "checkpoint": self.identity,
                "sampler": self.settings.pop("sampler", None),
                "seeds": {"seed": cfg.seed, **self.settings.pop("seeds", {})},
                **self.settings, "data": hash_files(self.files), "evaluators": evaluators,
                "world_size": self.dist.world_size, "device": str(self.dist.device), "precision": cfg.precision,
                "precision_reason": self.precision_reason,
                "timings_s": self.timings}


def checkpoint_identity(ckpt: Checkpoint) -> dict:
    ident = tree_identity(ckpt.path)
    return {"kind": ckpt.kind, **ident, "tokenizer": {"path": str(ckpt.tokenizer.path.resolve()),
                                                       "sha256": ckpt.tokenizer.sha256}}


# ----------------------------------------------------------------------------- parts


def recon_part(run: Run, source: str) -> dict:
    """Reconstruction metrics over ``source`` (folder or shards); ``recon_grid.png`` on rank 0."""
    from data.loader import expand_shards
    from eval.recon import IMAGE_SUFFIXES
    from tokenizer.lpips import LPIPS
    from unimllm.stages.reconstruction import evaluate_reconstruction

    r = run.cfg.recon
    if Path(source).is_dir():
        files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        run.read(*files[: r.max_images or None])
    elif ".tar" in source:
        run.read(*expand_shards(source))
    run.read(r.inception_weights, r.lpips_vgg, r.lpips_heads)
    lp = LPIPS(r.lpips_vgg, r.lpips_heads or r.lpips_vgg, vgg_field="recon.lpips_vgg",
               heads_field="recon.lpips_heads") if r.lpips_vgg else None
    grid = run.out / "recon_grid.png" if r.grid_images and run.dist.is_main else None
    metrics = evaluate_reconstruction(run.tokenizer(), source, depth=r.depth or None, batch_size=r.batch_size,
                                      inception_weights=r.inception_weights or None, lpips=lp,
                                      max_images=r.max_images or None, rank=run.dist.rank,
                                      world_size=run.dist.world_size, grid_path=grid, grid_images=r.grid_images)
    if grid is not None and grid.is_file():
        run.images["recon/grid"] = grid
    run.settings["recon"] = {"source": source, "depth": metrics["depth"], "max_images": r.max_images,
                             "rfid": bool(r.inception_weights), "lpips": bool(r.lpips_vgg)}
    return metrics


def answer(run: Run, questions: Sequence, load_image: Callable, *, batch: int, max_new_tokens: int,
           suffix: str) -> list[str]:
    """Greedy replies to every question (this rank answers index % world == rank; all ranks get all)."""
    pipe, d = run.pipeline(), run.dist
    mine = list(range(d.rank, len(questions), d.world_size))
    got: dict[int, str] = {}
    for s in progress_bar(range(0, len(mine), batch), desc="answer", unit="batch", main=d.is_main):
        idx = mine[s: s + batch]
        replies = pipe.answer([load_image(questions[i]) for i in idx], [questions[i].question + suffix for i in idx],
                              max_new_tokens=max_new_tokens, batch=batch)
        got.update(zip(idx, replies))
    merged: dict[int, str] = {}
    for part in gather_objects(got):
        merged.update(part)
    return [merged[i] for i in range(len(questions))]


def mme_part(run: Run, questions: list) -> dict:
    """Replies (eval_tool results + replies.jsonl in ``mme/``) and :func:`eval.mme.score_mme`."""
    from eval.mme import load_image, score_mme, write_predictions

    m = run.cfg.mme
    if not questions:
        raise ValueError("mme: no questions read")
    replies = answer(run, questions, load_image, batch=m.batch_size, max_new_tokens=m.max_new_tokens,
                     suffix=m.prompt_suffix)
    run.settings["answering"] = {"decoding": "greedy", "max_new_tokens": m.max_new_tokens,
                                 "prompt_suffix": m.prompt_suffix, "max_images": m.max_images,
                                 "questions": len(questions)}
    if run.dist.is_main:
        write_predictions(run.out / "mme", questions, replies)
    return score_mme(questions, replies)


def first_images(questions: list, n: int) -> list:
    """Questions of the first ``n`` images of each subtask (all when n == 0)."""
    if not n:
        return questions
    seen: dict[str, list[str]] = {}
    for q in questions:
        ids = seen.setdefault(q.subtask, [])
        if q.image_id not in ids and len(ids) < n:
            ids.append(q.image_id)
    return [q for q in questions if q.image_id in seen[q.subtask]]


def per_tag(specs: list[dict], n: int) -> list[dict]:
    """The first ``n`` prompts of each tag, in file order (all when n == 0)."""
    seen: Counter = Counter()
    out = []
    for s in specs:
        if not n or seen[s["tag"]] < n:
            out.append(s)
            seen[s["tag"]] += 1
    return out


def generate_images(pipe, prompts: list[str], seeds: list[int], sampler) -> list[np.ndarray]:
    """uint8 (H, W, 3) images, image k drawn with its own generator seeded ``seeds[k]`` (see GENERATOR)."""
    return pipe.generate_image(prompts, seeds=seeds, batch=len(prompts), **dataclasses.asdict(sampler))


def layout_grid(layout: Path, n: int, path: Path, cols: int = 8) -> Path | None:
    """The first ``n`` images of a layout (prompt order, samples in order) tiled ``cols`` wide."""
    from eval.geneval import read_layout

    paths = [p for _, ps in read_layout(layout) for p in ps][:n]
    if not paths:
        return None
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    blank = [np.zeros_like(imgs[0])]
    rows = [np.concatenate(imgs[i: i + cols] + blank * (cols - len(imgs[i: i + cols])), 1)
            for i in range(0, len(imgs), cols)] if len(imgs) > cols else [np.concatenate(imgs, 1)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return path


def generate_part(run: Run, prompts_file: str | Path) -> tuple[Path, dict]:
    """Generate the layout ``<out>/geneval`` (resumable; refused if its manifest has other settings)."""
    from eval.geneval import SEED_RULE, generate_layout, read_prompts

    g, d = run.cfg.geneval, run.dist
    specs = per_tag(read_prompts(prompts_file), g.max_per_tag)
    run.read(prompts_file)
    pipe, sampler = run.pipeline(), run.sampler()
    manifest = {**dataclasses.asdict(sampler), "checkpoint_sha256": run.identity["sha256"], "generator": GENERATOR}
    layout = run.out / "geneval"
    counts = generate_layout(layout, specs if g.max_per_tag else prompts_file, lambda texts, seeds: generate_images(pipe, texts, seeds, sampler),
                             n_samples=g.n_samples, seed=run.cfg.seed, rank=d.rank, world_size=d.world_size,
                             batch=g.batch_size, manifest=manifest)
    parts = gather_objects(counts)
    totals = {k: sum(c[k] for c in parts) for k in counts}
    barrier()  # every rank's images are on disk
    run.settings["sampler"] = dataclasses.asdict(sampler)
    run.settings["seeds"] = {"geneval_seed_rule": SEED_RULE, "generator": GENERATOR}
    run.settings["geneval"] = {"prompts": str(prompts_file), "max_per_tag": g.max_per_tag, "n_prompts": len(specs),
                               "n_samples": g.n_samples, "layout": str(layout)}
    if d.is_main and g.grid_images and layout_grid(layout, g.grid_images, run.out / "geneval_grid.png"):
        run.images["geneval/samples"] = run.out / "geneval_grid.png"
    return layout, totals


# ----------------------------------------------------------------------------- suites


def suite_recon(run: Run) -> dict:
    return {"recon": run.timed("recon", lambda: recon_part(run, run.cfg.recon.source))}


def suite_mme(run: Run) -> dict:
    from eval.mme import load_mme

    m = run.cfg.mme
    questions = first_images(load_mme(m.path, m.image_root or None), m.max_images)
    src = Path(m.path)
    run.read(*([src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix in (".parquet", ".txt"))))
    run.read(*dict.fromkeys(q.image for q in questions if isinstance(q.image, str)))
    return {"mme": run.timed("mme", lambda: mme_part(run, questions))}


def suite_pope(run: Run) -> dict:
    from eval.pope import load_image, load_pope, score_pope, write_answers

    p = run.cfg.pope
    questions = load_pope(p.path, p.image_root or None, p.splits)
    if p.max_questions:
        questions = [q for s in p.splits for q in [q for q in questions if q.split == s][: p.max_questions]]
    src = Path(p.path)
    run.read(*([src] if src.is_file() else sorted(x for x in src.rglob("*") if x.suffix in (".parquet", ".json",
                                                                                               ".jsonl"))))
    run.read(*dict.fromkeys(q.image for q in questions if isinstance(q.image, str)))

    def part() -> dict:
        replies = answer(run, questions, load_image, batch=p.batch_size, max_new_tokens=p.max_new_tokens,
                         suffix=p.prompt_suffix)
        run.settings["answering"] = {"decoding": "greedy", "max_new_tokens": p.max_new_tokens, "rule": p.rule,
                                     "prompt_suffix": p.prompt_suffix, "questions": len(questions)}
        if run.dist.is_main:
            write_answers(run.out / "pope" / "answers.jsonl", questions, replies)
        return score_pope(questions, replies, rule=p.rule)

    return {"pope": run.timed("pope", part)}


def suite_geneval(run: Run) -> dict:
    from eval.geneval import DEFAULT_DETECTOR, OFFICIAL_PROMPTS, run_scorer, scorer_command

    g = run.cfg.geneval
    layout, gen = run.timed("geneval_generate", lambda: generate_part(run, g.prompts or OFFICIAL_PROMPTS))
    if not run.dist.is_main:
        return {}
    results = run.out / "geneval_results.jsonl"
    if not g.scorer_python:
        cmd = scorer_command("<scorer python>", "<geneval checkout>", layout.resolve(), results.resolve(),
                             "<detector folder>", g.scorer_options or None)
        hint = (f"cd <geneval checkout> && {' '.join(map(str, cmd))}; then "
                f"eval.geneval.summarize_results('{results}') (docs/geneval.md), or rerun with "
                "--geneval.scorer_python/--geneval.geneval_dir/--geneval.detector_path")
        print0(f"eval: GenEval images generated in {layout}; not scored. To score: {hint}")
        return {"geneval": {"scored": False, "generation": gen, "how_to_score": hint}}
    detector = Path(g.detector_path) / f"{g.scorer_options.get('model', DEFAULT_DETECTOR)}.pth"
    report = run.timed("geneval_score", lambda: run_scorer(g.scorer_python, g.geneval_dir, layout, results,
                                                           g.detector_path, g.scorer_options or None))
    run.settings["scorer"] = {"name": "djghosh13/geneval evaluation/evaluate_images.py", "python": g.scorer_python,
                              "geneval_dir": str(Path(g.geneval_dir).resolve()), "git": git_state(g.geneval_dir),
                              "detector": {str(detector.resolve()): sha256_file(detector)},
                              "options": g.scorer_options}
    return {"geneval": {**report, "generation": gen}}


def suite_shapes(run: Run) -> dict:
    from eval import shapes_scorer
    from eval.geneval import score_shapes_layout
    from eval.mme import shapes_questions

    s, m = run.cfg.shapes, run.cfg.mme
    out: dict[str, Any] = {}
    out["recon"] = run.timed("recon", lambda: recon_part(run, s.shards))  # read() hashes the shards
    questions = shapes_questions(s.shards, m.max_images or None)
    out["shapes_mme"] = run.timed("shapes_mme", lambda: mme_part(run, questions))
    layout, gen = run.timed("shapes_geneval_generate", lambda: generate_part(run, s.geneval_prompts))
    if not run.dist.is_main:
        return out

    def score() -> dict:
        rep, ctrl = score_shapes_layout(layout, run.out / "geneval_results.jsonl", seed=run.cfg.seed,
                                        control_jsonl=run.out / "geneval_results_shuffled.jsonl")
        ratio = rep["overall"] / ctrl["overall"] if ctrl["overall"] else None
        control = {k: ctrl[k] for k in ("tags", "overall", "counts", "n_images")}
        return {**rep, "control": control, "ratio": ratio, "generation": gen}

    out["shapes_geneval"] = run.timed("shapes_geneval_score", score)
    run.settings["scorer"] = {"name": "eval.shapes_scorer", "module_sha256": sha256_file(shapes_scorer.__file__),
                              "config": dataclasses.asdict(shapes_scorer.ScorerConfig()), "control": CONTROL}
    run.settings["seeds"]["control"] = f"shuffled_partner seed = {run.cfg.seed}"
    return out


SUITES: dict[str, Callable[[Run], dict]] = {"recon": suite_recon, "mme": suite_mme, "pope": suite_pope,
                                            "geneval": suite_geneval, "shapes": suite_shapes}


# ----------------------------------------------------------------------------- entry


def _scalars(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}/{k}"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = v
    return out


def log_results(run: Run, scores: dict) -> None:
    """Scores (``eval/<part>/<key>``) and the grids through unimllm's logger (JSONL + console + W&B)."""
    cfg, ck = run.cfg, run.ckpt.path.resolve()
    name = cfg.log.name or f"eval-{cfg.suite}-{ck.parent.parent.name if ck.parent.name == 'export' else ck.name}"
    logger = build_logger(run.out, is_main=True, wandb_mode=cfg.log.wandb_mode, project=cfg.log.wandb_project,
                          name=name, config=to_dict(cfg), console_keys=HEADLINE)
    logger.log({k: v for part, d in scores.items() for k, v in _scalars(d, f"eval/{part}").items()}, step=0)
    for key, path in run.images.items():
        with Image.open(path) as img:
            logger.log_image(f"eval/{key}", img.convert("RGB"), step=0)
    logger.close()


def run(cfg: EvalConfig, dist: DistInfo, argv: Sequence[str] | None = None) -> dict:
    """Run ``cfg.suite`` on ``cfg.ckpt``; rank 0 writes settings.json, scores.json, report.md and logs.
    Returns the scores (complete on rank 0)."""
    ckpt = resolve_checkpoint(cfg.ckpt, cfg.suite, cfg.tokenizer)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    requested = cfg.precision
    cfg.precision, reason = resolve_eval_precision(requested, dist.device)
    print0(f"eval precision: {cfg.precision} ({reason})", is_main=dist.is_main)
    out = output_dir(cfg, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    r = Run(cfg, dist, ckpt, out)
    r.precision_reason = reason
    r.identity = broadcast_object(checkpoint_identity(ckpt) if dist.is_main else None)
    scores = SUITES[cfg.suite](r)
    if dist.is_main:
        write_report(out, r.pinned(argv), scores)
        log_results(r, scores)
        print0(f"eval: wrote {out}/settings.json, scores.json, report.md")
    return scores
