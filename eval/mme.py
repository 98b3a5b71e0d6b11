"""MME: read the benchmark in its official layouts, parse yes/no answers, score as the official eval_tool.

Layouts read by :func:`load_mme` (all give the same :class:`MMEQuestion` records):

- ``MME_Benchmark_release_version/[MME_Benchmark/]<subtask>/``: one ``<stem>.txt`` per image with
  ``question<TAB>answer`` lines, next to ``<stem>.jpg|png`` (existence, count, position, color, OCR and the
  cognition subtasks) or in ``questions_answers_YN/`` with the image in ``images/`` (artwork, celebrity,
  landmark, posters, scene).
- eval_tool's ``Your_Results/<subtask>.txt`` (``image<TAB>question<TAB>answer[<TAB>prediction]``) with the
  images under ``image_root/<subtask>/[images/]<image>``; ``python -m data.shapes`` writes its shapes-MME set
  (``val/mme``) this way, images next to the txt files.
- lmms-lab/MME parquet (one file or a folder of shards): ``question_id`` (``<category>/<image>``), ``image``
  (``{"bytes", "path"}``), ``question``, ``answer``, ``category``.

Subtask names are the eval_tool's (``OCR``, ``posters``, ``commonsense_reasoning``, ...); lmms-eval's
categories and the release folders use the same spellings, matched here without regard to case, spaces or
hyphens. Scores follow eval_tool's calculation.py: per subtask acc (% of questions right) + acc+ (% of
images with all their questions right), each in percent (max 200), summed over the perception and the
cognition subtasks present.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PARQUET_COLUMNS = ("question_id", "image", "question", "answer", "category")
_CANON = {s.lower(): s for s in SUBTASKS} | {"poster": "posters"}


def parse_yes_no(reply: str) -> str:
    """'yes' / 'no' when the reply starts with it (case-insensitive, after whitespace), else 'other'
    (the official tool counts 'other' as wrong)."""
    r = reply.strip().lower()
    if r.startswith("yes"):
        return "yes"
    if r.startswith("no"):
        return "no"
    return "other"


@dataclass(frozen=True)
class MMEQuestion:
    """One yes/no question; ``question_id`` is ``<subtask>/<image_id>/<k>`` (k-th question on the image)."""

    question_id: str
    subtask: str
    image_id: str
    image: str | bytes | np.ndarray = field(compare=False, repr=False)
    "A file path, encoded image bytes or a uint8 (H, W, 3) array."
    question: str
    answer: str
    "'Yes' or 'No'."


def canonical_subtask(name: str) -> str | None:
    """The eval_tool spelling of a subtask / category / folder name, or None when it is not an MME subtask."""
    return _CANON.get(name.strip().lower().replace(" ", "_").replace("-", "_"))


def load_image(q: MMEQuestion) -> Image.Image:
    """The question's image as an RGB PIL image."""
    if isinstance(q.image, np.ndarray):
        return Image.fromarray(q.image).convert("RGB")
    src = io.BytesIO(q.image) if isinstance(q.image, bytes) else q.image
    with Image.open(src) as img:
        return img.convert("RGB")


def _answer(raw: str, where: str) -> str:
    a = raw.strip().lower().rstrip(".")
    if a not in ("yes", "no"):
        raise ValueError(f"{where}: the answer must be Yes or No, got {raw!r}")
    return a.capitalize()


def _finish(rows: list[tuple[str, str, object, str, str, str]]) -> list[MMEQuestion]:
    """(subtask, image_id, image, question, answer, where) rows -> records numbered per image, in a fixed
    order (subtask as in SUBTASKS, then image id); a repeated question on one image is an error."""
    seen: dict[tuple[str, str, str], str] = {}
    per_image: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for subtask, image_id, image, question, answer, where in rows:
        key = (subtask, image_id, question)
        if key in seen:
            raise ValueError(f"{where}: question {question!r} on {subtask}/{image_id} already read from "
                             f"{seen[key]} (two copies of the data?)")
        seen[key] = where
        k = per_image[subtask, image_id]
        per_image[subtask, image_id] += 1
        out.append(MMEQuestion(f"{subtask}/{image_id}/{k}", subtask, image_id, image, question, answer))
    return sorted(out, key=lambda q: (SUBTASKS.index(q.subtask), q.image_id))  # stable: k order kept


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank lines of a txt file as (line number, tab fields)."""
    text = path.read_text(encoding="utf-8-sig")
    return [(i, line.rstrip("\r").split("\t")) for i, line in enumerate(text.split("\n"), 1) if line.strip()]


def _find_image(folder: Path, stem: str) -> Path | None:
    hits = [folder / (stem + ext) for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)]
    return next((p for p in hits if p.is_file()), None)


def _load_release(root: Path, folders: dict[str, Path]) -> list[MMEQuestion]:
    rows: list = []
    for subtask, folder in folders.items():
        split = (folder / "questions_answers_YN").is_dir()
        qa_dir, img_dir = (folder / "questions_answers_YN", folder / "images") if split else (folder, folder)
        for txt in sorted(qa_dir.glob("*.txt")):
            image = _find_image(img_dir, txt.stem)
            if image is None:
                raise ValueError(f"{txt}: no image {txt.stem}.jpg/.png in {img_dir}")
            for n, fields in _read_lines(txt):
                if len(fields) != 2:
                    raise ValueError(f"{txt}:{n}: expected 'question<TAB>answer', got {len(fields)} tab "
                                     "field(s)")
                where = f"{txt}:{n}"
                rows.append((subtask, image.name, str(image), fields[0], _answer(fields[1], where), where))
    return _finish(rows)


def _load_eval_tool(txts: dict[str, Path], image_root: Path) -> list[MMEQuestion]:
    folders = {canonical_subtask(p.name): p for p in image_root.iterdir() if p.is_dir()}
    rows: list = []
    for subtask, txt in txts.items():
        folder = folders.get(subtask, image_root / subtask)
        for n, fields in _read_lines(txt):
            where = f"{txt}:{n}"
            if len(fields) not in (3, 4):
                raise ValueError(f"{where}: expected 'image<TAB>question<TAB>answer[<TAB>prediction]', "
                                 f"got {len(fields)} tab field(s)")
            name = fields[0].strip()
            image = next((p for p in (folder / name, folder / "images" / name) if p.is_file()), None)
            if image is None:
                raise ValueError(f"{where}: image {name!r} not found in {folder} or {folder / 'images'} "
                                 "(image_root: the folder of the <subtask>/ image folders)")
            rows.append((subtask, name, str(image), fields[1], _answer(fields[2], where), where))
    return _finish(rows)


def _load_parquet(files: list[Path]) -> list[MMEQuestion]:
    import pyarrow.parquet as pq

    rows: list = []
    for f in files:
        missing = [c for c in PARQUET_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; lmms-lab/MME has {list(PARQUET_COLUMNS)}")
        table = pq.read_table(f, columns=list(PARQUET_COLUMNS)).to_pydict()
        for i, (qid, img, question, answer, category) in enumerate(zip(*(table[c] for c in PARQUET_COLUMNS))):
            where = f"{f}: row {i}"
            subtask = canonical_subtask(str(category))
            if subtask is None:
                raise ValueError(f"{where}: unknown MME category {category!r}")
            data = img.get("bytes") if isinstance(img, dict) else img
            if not data:
                raise ValueError(f"{where}: no image bytes")
            rows.append((subtask, str(qid).rsplit("/", 1)[-1], data, question, _answer(answer, where), where))
    return _finish(rows)


def load_mme(path: str | Path, image_root: str | Path | None = None) -> list[MMEQuestion]:
    """All questions of an MME copy in any layout of the module docstring (a parquet file or a folder).

    ``image_root``: where the eval_tool layout's images are (default: ``path`` itself)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return _load_parquet([path])
    if not path.is_dir():
        raise ValueError(f"{path}: not an MME folder or parquet file")
    shards = sorted(path.rglob("*.parquet"))
    if shards:
        return _load_parquet(shards)
    txts = {s: p for p in sorted(path.glob("*.txt")) if (s := canonical_subtask(p.stem))}
    if txts:
        return _load_eval_tool(txts, Path(image_root) if image_root else path)
    for root in (path, path / "MME_Benchmark"):
        folders = {s: p for p in sorted(root.iterdir()) if p.is_dir() and (s := canonical_subtask(p.name))} \
            if root.is_dir() else {}
        if folders:
            return _load_release(root, dict(sorted(folders.items(), key=lambda kv: SUBTASKS.index(kv[0]))))
    raise ValueError(f"{path}: unknown MME layout (no *.parquet, no <subtask>.txt, no <subtask>/ folder of "
                     f"{', '.join(SUBTASKS)})")


def shapes_questions(shards: str, max_images: int | None = None, *, resolution: int | None = None,
                     batch_size: int = 32) -> list[MMEQuestion]:
    """The shapes-MME set from held-out shapes shards (records' ``mme`` field), images as uint8 arrays.

    ``max_images`` caps the scenes read; ``resolution`` defaults to the images' own size. Image ids are
    ``<key>.png``, as in the ``val/mme`` folder ``python -m data.shapes`` writes."""
    from data.loader import eval_loader, expand_shards
    from data.schema import sample_image
    from data.tar_index import iter_shard

    if resolution is None:
        paths = expand_shards(shards)
        if not paths:
            raise ValueError(f"shards {shards!r}: no path")
        resolution = min(sample_image(next(iter_shard(paths[0]))).size)
    loader = eval_loader(shards, batch_size, resolution)
    rows: list = []
    n = 0
    for batch in loader:
        for key, img, meta in zip(batch["__key__"], batch["image"], batch["json"]):
            if max_images is not None and n >= max_images:
                return _finish(rows)
            n += 1
            arr = np.asarray(img)  # (H, W, 3) uint8
            for name, pairs in (meta.get("mme") or {}).items():
                subtask = canonical_subtask(name)
                if subtask is None:
                    raise ValueError(f"{key}: unknown MME subtask {name!r}")
                for q in pairs:
                    rows.append((subtask, f"{key}.png", arr, q["question"], _answer(q["answer"], key), key))
    if loader.skip_counts():
        log.warning("shapes MME: skipped samples %s", loader.skip_counts())
    return _finish(rows)


def _aligned(questions: Sequence[MMEQuestion], replies: Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(replies, Mapping):
        missing = [q.question_id for q in questions if q.question_id not in replies]
        if missing:
            raise ValueError(f"no reply for {len(missing)} question(s), e.g. {missing[:3]}")
        return [replies[q.question_id] for q in questions]
    if len(replies) != len(questions):
        raise ValueError(f"{len(replies)} replies for {len(questions)} questions")
    return list(replies)


def score_mme(questions: Sequence[MMEQuestion],
              replies: Sequence[str] | Mapping[str, str]) -> dict[str, float]:
    """Per subtask ``<s>/acc``, ``<s>/acc_plus``, ``<s>/score`` (= acc + acc_plus, percent) and
    ``<s>/unparsed``; ``perception`` / ``cognition`` (sums of the subtask scores present), ``total``,
    ``unparsed`` (replies that are neither yes nor no: wrong), ``questions``, ``images``.

    ``replies``: one per question, in order, or a mapping question_id -> reply."""
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[str, int] = defaultdict(int)
    for q, reply in zip(questions, _aligned(questions, replies)):
        pred = parse_yes_no(reply)
        unparsed[q.subtask] += pred == "other"
        per_image[q.subtask][q.image_id].append(pred == q.answer.lower())
    out: dict[str, float] = {}
    for s in (s for s in SUBTASKS if s in per_image):
        verdicts = list(per_image[s].values())
        out[f"{s}/acc"] = 100.0 * sum(map(sum, verdicts)) / sum(map(len, verdicts))
        out[f"{s}/acc_plus"] = 100.0 * sum(all(v) for v in verdicts) / len(verdicts)
        out[f"{s}/score"] = out[f"{s}/acc"] + out[f"{s}/acc_plus"]
        out[f"{s}/unparsed"] = unparsed[s]
    out["perception"] = sum(out[f"{s}/score"] for s in PERCEPTION if s in per_image)
    out["cognition"] = sum(out[f"{s}/score"] for s in COGNITION if s in per_image)
    out["total"] = out["perception"] + out["cognition"]
    out["unparsed"] = sum(unparsed.values())
    out["questions"] = len(questions)
    out["images"] = sum(len(v) for v in per_image.values())
    return out


def write_predictions(path: str | Path, questions: Sequence[MMEQuestion],
                      replies: Sequence[str] | Mapping[str, str]) -> list[Path]:
    """Write ``path/<subtask>.txt`` in eval_tool's results format (``image, question, answer, prediction``
    tab-separated, an image's questions on consecutive lines; the prediction is the reply on one line) and
    ``path/replies.jsonl`` with every reply untouched and its parsed label. Returns the files written.

    calculation.py reads all 14 subtask files and expects 2 questions per image: a partial set (e.g. the
    shapes world's 4 subtasks) scores with :func:`score_mme` only."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    replies = _aligned(questions, replies)
    by_subtask: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, q in enumerate(questions):
        for text in (q.image_id, q.question):
            if any(c in text for c in "\t\r\n"):
                raise ValueError(f"{q.question_id}: a tab or newline in {text!r} breaks the eval_tool format")
        by_subtask[q.subtask][q.image_id].append(i)
    written = []
    for s, images in by_subtask.items():
        lines = [f"{questions[i].image_id}\t{questions[i].question}\t{questions[i].answer}\t"
                 f"{' '.join(replies[i].split())}\n" for idx in images.values() for i in idx]
        written.append(out / f"{s}.txt")
        written[-1].write_text("".join(lines), encoding="utf-8")
    with open(out / "replies.jsonl", "w", encoding="utf-8") as f:
        for q, reply in zip(questions, replies):
            rec = {"question_id": q.question_id, "subtask": q.subtask, "image_id": q.image_id,
                   "question": q.question, "answer": q.answer, "reply": reply, "parsed": parse_yes_no(reply)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    written.append(out / "replies.jsonl")
    return written
