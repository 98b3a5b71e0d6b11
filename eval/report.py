"""What an evaluation run writes: ``settings.json`` (provenance), ``scores.json`` and ``report.md``.

``settings.json`` pins what was run: the resolved config, the sampler and seeds used, the sha256 of the
checkpoint and of every data file read, and the evaluator versions (:func:`evaluator_versions`).
``report.md`` has one Markdown table per scored part (:func:`markdown_report`).
"""

from __future__ import annotations

import hashlib
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from unimllm.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "torchmetrics", "safetensors", "pillow")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: list[str | Path]) -> dict[str, str]:
    """``{path: sha256}`` (paths as given, resolved to absolute), in the order given, duplicates once."""
    return {str(Path(p).resolve()): sha256_file(p) for p in dict.fromkeys(str(p) for p in paths)}


def tree_identity(folder: str | Path) -> dict:
    """sha256 of every file under ``folder`` and one digest over them (relative path + file sha256)."""
    root = Path(folder)
    files = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    digest = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {"path": str(root.resolve()), "sha256": digest, "files": files}


def git_state(folder: str | Path = ROOT) -> dict:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder`` (None where git cannot tell)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def evaluator_versions() -> dict:
    """unimllm's version and git state, python and the numeric packages' versions."""
    from unimllm import __version__

    out: dict[str, Any] = {"unimllm": __version__, "git": git_state(), "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, Paths -> str, tuples -> lists, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Indented, strict JSON (NaN -> null), written atomically."""
    return atomic_write_json(path, clean(obj), allow_nan=False)


# ----------------------------------------------------------------------------- Markdown


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mme_table(s: dict) -> str:
    """Per subtask acc / acc+ / score (percent) and the perception, cognition and total sums."""
    from eval.mme import COGNITION, PERCEPTION

    subtasks = [k[: -len("/acc")] for k in s if k.endswith("/acc")]
    rows = [[t, s[f"{t}/acc"], s[f"{t}/acc_plus"], s[f"{t}/score"], s[f"{t}/unparsed"]] for t in subtasks]
    groups = [k for k, names in (("perception", PERCEPTION), ("cognition", COGNITION)) if set(names) & set(subtasks)]
    rows += [[f"**{k}**", None, None, s[k], None] for k in (*groups, "total")]
    note = f"{s['questions']} questions on {s['images']} images; {s['unparsed']} replies neither yes nor no (wrong)."
    return table(["subtask", "acc", "acc+", "score", "unparsed"], rows) + "\n\n" + note


def geneval_table(s: dict) -> str:
    """GenEval tags + overall; with a ``control`` (shuffled prompts), its column and matched / control."""
    if "tags" not in s:
        return f"Not scored: {s.get('how_to_score', 'no scorer configured')}"
    ctrl = s.get("control")

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    rows = []
    for tag, v in [*s["tags"].items(), ("**overall**", s["overall"])]:
        c = None if ctrl is None else ctrl["overall"] if tag == "**overall**" else ctrl["tags"].get(tag)
        rows.append([tag, v] + ([] if ctrl is None else [c, None if c is None else ratio(v, c)]))
    header = ["tag", "score"] + ([] if ctrl is None else ["shuffled-prompt control", "ratio"])
    note = f"{s['n_images']} images of {s['n_prompts']} distinct prompts."
    if s.get("missing_tags"):
        note += f" Missing tags: {', '.join(s['missing_tags'])} (overall not comparable to published numbers)."
    return table(header, rows, 3) + "\n\n" + note


def recon_table(s: dict) -> str:
    keys = ["n_images", "depth", "psnr", "ssim", "ssim_llamagen", "lpips", "rfid", "skipped"]
    keys += sorted((k for k in s if k.startswith(("usage_d", "perplexity_d"))),
                   key=lambda k: (k.startswith("perplexity"), int(k.split("_d")[1])))
    return table(["metric", "value"], [[k, s[k]] for k in keys if k in s], 4)


def pope_table(s: dict) -> str:
    metrics = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    splits = [k[: -len("/accuracy")] for k in s if k.endswith("/accuracy")]
    rows = [[sp, *(s[f"{sp}/{m}"] for m in metrics), s.get(f"{sp}/unparsed")] for sp in splits]
    return table(["split", *metrics, "unparsed"], rows, 4) + f"\n\n{s['questions']} questions."


TABLES = {"recon": ("Reconstruction", recon_table), "mme": ("MME", mme_table), "shapes_mme": ("Shapes-MME", mme_table),
          "pope": ("POPE", pope_table), "geneval": ("GenEval", geneval_table),
          "shapes_geneval": ("Shapes-GenEval", geneval_table)}


def markdown_report(scores: dict, settings: dict) -> str:
    """``report.md``: what was evaluated, then one table per part of ``scores``."""
    ck, git = settings["checkpoint"], settings["evaluators"]["git"]
    lines = [f"# Evaluation: {settings['suite']}", "",
             f"- checkpoint: `{ck['path']}` ({ck['kind']}, sha256 {ck['sha256'][:16]})",
             f"- code: unimllm {settings['evaluators']['unimllm']}, commit {git['commit'] or 'unknown'}"
             + (" (dirty)" if git["dirty"] else ""),
             f"- seed: {settings['seeds']['seed']}, world size {settings['world_size']}, device {settings['device']}"]
    if settings.get("sampler"):
        lines.append("- sampler: " + ", ".join(f"{k}={v}" for k, v in settings["sampler"].items()))
    for key, part in scores.items():
        if key in TABLES:
            title, fn = TABLES[key]
            lines += ["", f"## {title}", "", fn(part)]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, settings: dict, scores: dict) -> list[Path]:
    """``settings.json``, ``scores.json`` and ``report.md`` in ``out``."""
    out = Path(out)
    md = out / "report.md"
    md.write_text(markdown_report(clean(scores), clean(settings)))
    return [write_json(out / "settings.json", settings), write_json(out / "scores.json", scores), md]
