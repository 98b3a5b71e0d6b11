"""POPE (object hallucination): yes/no "Is there a <object> in the image?" on COCO val2014, three splits.

Inputs read by :func:`load_pope` (same :class:`PopeQuestion` records from both):

- the original files ``coco_pope_{adversarial,popular,random}.json`` (AoiDragon/POPE ``output/coco/``): one
  JSON object per line, ``question_id``, ``image`` (a file name in ``image_root``), ``text``, ``label``;
- lmms-lab/POPE parquet (``data/test-*.parquet``: the three splits in one table, or ``Full/<split>/``):
  ``question_id``, ``question``, ``answer``, ``image_source`` (file stem), ``image`` (``{"bytes", "path"}``),
  ``category`` (the split).

Scoring (:func:`score_pope`), yes = positive, per split and their mean (papers quote the mean F1):

- ``rule="official"`` (default): POPE's evaluate.py (also LLaVA's eval_pope.py): the reply's first sentence,
  commas removed, split on spaces; ``no`` when a word is ``No``, ``no`` or ``not``, else ``yes``. Every reply
  is yes or no: an unreadable reply counts as yes.
- ``rule="strict"``: :func:`eval.mme.parse_yes_no`; a reply that is neither yes nor no is wrong: it lowers
  accuracy, is a missed positive (FN) when the truth is yes, and is never a predicted yes.

``yes_ratio`` is the share of predictions that are yes (as evaluate.py; lmms-eval's aggregate reads the
ground truth instead, always 0.5). ``unparsed`` counts, under either rule, the replies that do not start with
yes or no.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from eval.mme import parse_yes_no

SPLITS = ("adversarial", "popular", "random")
PARQUET_COLUMNS = ("question_id", "question", "answer", "image_source", "image", "category")
JSON_FIELDS = ("question_id", "image", "text", "label")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question; ``image_id`` is the COCO file stem (``COCO_val2014_000000310196``)."""

    question_id: str
    split: str
    image_id: str
    image: str | bytes = field(compare=False, repr=False)
    "A file path or encoded image bytes."
    question: str
    answer: str
    "'yes' or 'no'."


def load_image(q: PopeQuestion) -> Image.Image:
    """The question's image as an RGB PIL image."""
    with Image.open(io.BytesIO(q.image) if isinstance(q.image, bytes) else q.image) as img:
        return img.convert("RGB")


def _label(raw: object, where: str) -> str:
    a = str(raw).strip().lower()
    if a not in ("yes", "no"):
        raise ValueError(f"{where}: the answer must be yes or no, got {raw!r}")
    return a


def _split(name: str, where: str) -> str:
    s = name.strip().lower()
    if s not in SPLITS:
        raise ValueError(f"{where}: unknown POPE split {name!r} (expected one of {', '.join(SPLITS)})")
    return s


def _load_json(path: Path, split: str, image_root: Path) -> list[PopeQuestion]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON object ({e})") from None
        missing = [k for k in JSON_FIELDS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; POPE lines have {list(JSON_FIELDS)}")
        image = image_root / str(rec["image"])
        if not image.is_file():
            raise ValueError(f"{where}: image {rec['image']!r} not found in {image_root}")
        out.append(PopeQuestion(str(rec["question_id"]), split, image.stem, str(image), rec["text"],
                                _label(rec["label"], where)))
    return out


def _load_parquet(path: Path) -> list[PopeQuestion]:
    import pyarrow.parquet as pq

    missing = [c for c in PARQUET_COLUMNS if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; lmms-lab/POPE has {list(PARQUET_COLUMNS)}")
    table = pq.read_table(path, columns=list(PARQUET_COLUMNS)).to_pydict()
    out = []
    columns = zip(*(table[c] for c in PARQUET_COLUMNS))
    for i, (qid, question, answer, source, img, category) in enumerate(columns):
        where = f"{path}: row {i}"
        data = img.get("bytes") if isinstance(img, dict) else img
        if not data:
            raise ValueError(f"{where}: no image bytes")
        split = _split(str(category), where)
        image_id = Path(str(source)).stem
        out.append(PopeQuestion(str(qid), split, image_id, data, question, _label(answer, where)))
    return out


def _json_split(path: Path) -> str:
    m = re.search(r"_([a-z]+)\.jsonl?$", path.name)  # coco_pope_adversarial.json -> adversarial
    return _split(m.group(1) if m else path.stem, f"{path} (split from the file name)")


def load_pope(path: str | Path, image_root: str | Path | None = None,
              splits: Sequence[str] = SPLITS) -> list[PopeQuestion]:
    """The questions of ``splits`` from a POPE json file, a parquet file, or a folder of either.

    ``image_root``: the COCO val2014 folder for the json format (default: the json file's folder)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet")) or sorted(path.glob("*pope_*.json*"))
        if not files:
            raise ValueError(f"{path}: no *.parquet and no *pope_<split>.json file")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{path}: no such POPE file or folder")
    wanted = {_split(s, "splits") for s in splits}
    questions: list[PopeQuestion] = []
    seen: dict[tuple[str, str], Path] = {}
    for f in files:
        if f.suffix == ".parquet":
            got = [q for q in _load_parquet(f) if q.split in wanted]
        elif _json_split(f) in wanted:
            got = _load_json(f, _json_split(f), Path(image_root) if image_root else f.parent)
        else:
            continue
        for q in got:
            if (q.split, q.question_id) in seen:
                raise ValueError(f"{f}: {q.split} question {q.question_id} already read from "
                                 f"{seen[q.split, q.question_id]} (two copies of the data?)")
            seen[q.split, q.question_id] = f
        questions += got
    if not questions:
        raise ValueError(f"{path}: no question of split(s) {sorted(wanted)}")
    return sorted(questions, key=lambda q: (SPLITS.index(q.split), *_natural(q.question_id)))


def _natural(qid: str) -> tuple[int, int | str]:
    return (0, int(qid)) if qid.isdigit() else (1, qid)


def parse_pope_official(reply: str) -> str:
    """POPE's evaluate.py: 'no' when the first sentence has the word No, no or not, else 'yes'."""
    words = reply.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def pope_metrics(labels: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes = positive) and yes_ratio (share of predicted yes) of
    predictions 'yes' / 'no' / 'other' (other: wrong, a missed positive when the truth is yes), and the
    counts tp, fp, tn, fn, other, n."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    pairs = list(zip(labels, preds))
    tp = sum(g == "yes" and p == "yes" for g, p in pairs)
    fp = sum(g == "no" and p == "yes" for g, p in pairs)
    tn = sum(g == "no" and p == "no" for g, p in pairs)
    fn = sum(g == "yes" and p != "yes" for g, p in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "other": sum(p not in ("yes", "no") for p in preds),
        "n": n,
    }


def _aligned(questions: Sequence[PopeQuestion], replies: Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(replies, Mapping):  # keyed "<split>/<question_id>"
        keys = [f"{q.split}/{q.question_id}" for q in questions]
        missing = [k for k in keys if k not in replies]
        if missing:
            raise ValueError(f"no reply for {len(missing)} question(s), e.g. {missing[:3]}")
        return [replies[k] for k in keys]
    if len(replies) != len(questions):
        raise ValueError(f"{len(replies)} replies for {len(questions)} questions")
    return list(replies)


def score_pope(questions: Sequence[PopeQuestion], replies: Sequence[str] | Mapping[str, str],
               rule: Literal["official", "strict"] = "official") -> dict[str, float]:
    """``<split>/<metric>`` for the splits present and ``mean/<metric>`` over them (metrics: accuracy,
    precision, recall, f1, yes_ratio), ``<split>/unparsed`` and ``unparsed`` (replies not starting with
    yes/no), ``questions``. ``replies``: one per question in order, or a mapping ``<split>/<question_id>``."""
    if rule not in ("official", "strict"):
        raise ValueError(f"rule: expected 'official' or 'strict', got {rule!r}")
    parse = parse_pope_official if rule == "official" else parse_yes_no
    replies = _aligned(questions, replies)
    out: dict[str, float] = {}
    present = [s for s in SPLITS if any(q.split == s for q in questions)]
    for s in present:
        idx = [i for i, q in enumerate(questions) if q.split == s]
        m = pope_metrics([questions[i].answer for i in idx], [parse(replies[i]) for i in idx])
        out.update({f"{s}/{k}": m[k] for k in METRICS})
        out[f"{s}/unparsed"] = sum(parse_yes_no(replies[i]) == "other" for i in idx)
    for k in METRICS:
        out[f"mean/{k}"] = sum(out[f"{s}/{k}"] for s in present) / len(present) if present else 0.0
    out["unparsed"] = sum(out[f"{s}/unparsed"] for s in present)
    out["questions"] = len(questions)
    return out


def write_answers(path: str | Path, questions: Sequence[PopeQuestion],
                  replies: Sequence[str] | Mapping[str, str]) -> Path:
    """One JSON line per question with the reply untouched and both parses (official, strict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q, reply in zip(questions, _aligned(questions, replies)):
            rec = {"question_id": q.question_id, "split": q.split, "image_id": q.image_id,
                   "question": q.question, "answer": q.answer, "reply": reply,
                   "official": parse_pope_official(reply), "strict": parse_yes_no(reply)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
