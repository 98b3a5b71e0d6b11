"""POPE loading (original json lines + COCO folder, lmms-lab parquet) and metrics against hand counts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.pope import load_image, load_pope, parse_pope_official, pope_metrics, score_pope, write_answers

# split -> [(image number, question, label, reply)]
FIXTURE = {
    "adversarial": [
        (1, "Is there a cat in the image?", "yes", "Yes"),                         # TP / TP
        (1, "Is there a dog in the image?", "no", "No, there is not."),            # TN / TN
        (2, "Is there a car in the image?", "yes", "There is no such object."),    # FN / FN (other)
        (2, "Is there a bus in the image?", "no", "Yes, there is a bus."),         # FP / FP
        (3, "Is there a cup in the image?", "yes", "I cannot tell"),               # TP / FN (other)
        (3, "Is there a fork in the image?", "no", "I do not see one"),            # TN / wrong (other)
        (4, "Is there a kite in the image?", "no", "no"),                          # TN / TN
        (4, "Is there a person in the image?", "yes", "yes"),                      # TP / TP
    ],
    "popular": [
        (1, "Is there a cat in the image?", "yes", "Yes."),                        # TP
        (1, "Is there a chair in the image?", "no", "yes"),                        # FP
        (5, "Is there a bowl in the image?", "yes", "No"),                         # FN
        (5, "Is there a sink in the image?", "no", "No."),                         # TN
    ],
}


def _name(i: int) -> str:
    return f"COCO_val2014_{i:012d}"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 7)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_json(root: Path) -> tuple[Path, Path]:
    """coco_pope_<split>.json files (question ids from 1 per split) and a val2014 image folder."""
    images = root / "val2014"
    images.mkdir(parents=True)
    for i in {i for rows in FIXTURE.values() for i, *_ in rows}:
        (images / f"{_name(i)}.jpg").write_bytes(_jpeg(i))
    files = root / "pope"
    files.mkdir()
    for split, rows in FIXTURE.items():
        lines = [json.dumps({"question_id": k, "image": f"{_name(i)}.jpg", "text": q, "label": a})
                 for k, (i, q, a, _) in enumerate(rows, 1)]
        (files / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return files, images


def parquet_rows() -> list[dict]:
    return [{"id": str(n), "question_id": str(k), "question": q, "answer": a, "image_source": _name(i),
             "image": {"bytes": _jpeg(i), "path": None}, "category": split}
            for n, (split, k, (i, q, a, _)) in enumerate(
                (s, k, r) for s, rows in FIXTURE.items() for k, r in enumerate(rows, 1))]


def replies_for(questions) -> list[str]:
    return [FIXTURE[q.split][int(q.question_id) - 1][3] for q in questions]


def test_official_parser_is_pope_evaluate_py():
    replies = ("Yes", "No, there is not.", "There is no such object.", "I cannot tell", "I do not see one",
               "no", "Yes. But no hat.", "Not sure", "")
    # only the first sentence counts, and "Not" is not one of its words No / no / not
    expected = ["yes", "no", "no", "yes", "no", "no", "yes", "yes", "yes"]
    assert [parse_pope_official(r) for r in replies] == expected


def test_metrics_by_hand_both_formats(tmp_path):
    files, images = write_json(tmp_path)
    from_json = load_pope(files, image_root=images)
    pq_file = tmp_path / "test-00000-of-00001.parquet"
    pd.DataFrame(parquet_rows()).to_parquet(pq_file)
    from_parquet = load_pope(pq_file)
    assert from_json == from_parquet and len(from_json) == 12
    assert from_json[0].image_id == _name(1) and from_json[0].split == "adversarial"
    for a, b in zip(from_json, from_parquet):
        assert np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(b)))

    for questions in (from_json, from_parquet):
        s = score_pope(questions, replies_for(questions))  # official rule
        # adversarial: TP 3 (1, 5, 8), FP 1 (4), TN 3 (2, 6, 7), FN 1 (3); 8 questions
        assert s["adversarial/accuracy"] == pytest.approx((3 + 3) / 8)
        assert s["adversarial/precision"] == pytest.approx(3 / (3 + 1))
        assert s["adversarial/recall"] == pytest.approx(3 / (3 + 1))
        assert s["adversarial/f1"] == pytest.approx(2 * 0.75 * 0.75 / (0.75 + 0.75))
        assert s["adversarial/yes_ratio"] == pytest.approx((3 + 1) / 8)
        # popular: TP 1, FP 1, FN 1, TN 1
        assert [s[f"popular/{k}"] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == \
            pytest.approx([2 / 4, 1 / 2, 1 / 2, 1 / 2, 2 / 4])
        assert s["mean/f1"] == pytest.approx((0.75 + 0.5) / 2)
        assert s["mean/accuracy"] == pytest.approx((0.75 + 0.5) / 2)
        keys = ("adversarial/unparsed", "popular/unparsed", "unparsed", "questions")
        assert [s[k] for k in keys] == [3, 0, 3, 12]
        assert "random/f1" not in s

        st = score_pope(questions, replies_for(questions), rule="strict")
        # adversarial, strict: TP 2 (1, 8), FP 1 (4), TN 2 (2, 7), FN 2 (3, 5), 3 unparsed (3, 5, 6) all wrong
        assert st["adversarial/accuracy"] == pytest.approx((2 + 2) / 8)
        assert st["adversarial/precision"] == pytest.approx(2 / (2 + 1))
        assert st["adversarial/recall"] == pytest.approx(2 / (2 + 2))
        assert st["adversarial/f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
        assert st["adversarial/yes_ratio"] == pytest.approx((2 + 1) / 8)
        assert st["popular/f1"] == pytest.approx(1 / 2)  # every popular reply starts with yes/no
        assert st["mean/f1"] == pytest.approx((4 / 7 + 1 / 2) / 2) and st["unparsed"] == 3

    keyed = {f"{q.split}/{q.question_id}": r for q, r in zip(from_json, replies_for(from_json))}
    assert score_pope(from_json, keyed) == score_pope(from_json, replies_for(from_json))
    only_pop = load_pope(files, image_root=images, splits=["popular"])
    assert [q.split for q in only_pop] == ["popular"] * 4
    assert load_pope(pq_file, splits=["popular"]) == only_pop

    out = write_answers(tmp_path / "answers.jsonl", from_json, replies_for(from_json))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reply"] for r in recs] == replies_for(from_json)
    assert (recs[4]["official"], recs[4]["strict"]) == ("yes", "other")  # "I cannot tell"


def test_pope_metrics_counts():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "other", "other", "yes", "no"])
    # TP 1, FN 2 (a no and an unparsed), FP 1, TN 0, 2 other
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"], m["n"]) == (1, 1, 0, 2, 2, 5)
    got = [m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]]
    assert got == pytest.approx([1 / 5, 1 / 2, 1 / 3, 2 / 5])
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))  # = 0.4


def test_clear_errors(tmp_path):
    files, images = write_json(tmp_path)
    bad = files / "coco_pope_popular.json"
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps({"question_id": 3, "image": f"{_name(5)}.jpg", "text": "Is there a bowl?"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:3: missing field\(s\) \['label'\]"):
        load_pope(files, image_root=images)
    lines[2] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_popular\.json:3: not a JSON object"):
        load_pope(bad, image_root=images)
    with pytest.raises(ValueError, match=r"coco_pope_adversarial\.json:1: image 'COCO_val2014_0+1\.jpg' not"):
        load_pope(files / "coco_pope_adversarial.json")  # images are not next to the json
    no_source = tmp_path / "nosource.parquet"
    pd.DataFrame(parquet_rows()).drop(columns=["image_source"]).to_parquet(no_source)
    with pytest.raises(ValueError, match=r"nosource\.parquet: missing column\(s\) \['image_source'\]"):
        load_pope(no_source)
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("a.parquet", "b.parquet"):
        pd.DataFrame(parquet_rows()).to_parquet(twice / name)
    with pytest.raises(ValueError, match="already read from"):
        load_pope(twice)
    (tmp_path / "coco_pope_hard.json").write_text("")
    with pytest.raises(ValueError, match="unknown POPE split 'hard'"):
        load_pope(tmp_path / "coco_pope_hard.json")
    with pytest.raises(ValueError, match="rule: expected"):
        score_pope(load_pope(files, image_root=images, splits=["adversarial"]), ["yes"] * 8, rule="lenient")
