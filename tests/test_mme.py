"""MME loading (release folders, eval_tool txt, lmms-eval parquet, shapes shards), scoring and raw files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.mme import (
    canonical_subtask,
    load_image,
    load_mme,
    parse_yes_no,
    score_mme,
    shapes_questions,
    write_predictions,
)

# subtask -> image -> [(question, answer, reply)]; artwork uses the images/ + questions_answers_YN/ layout
FIXTURE = {
    "existence": {
        "e1.png": [("Is there a cat?", "Yes", "Yes"), ("Is there a dog?", "No", "No")],
        "e2.png": [("Is there a car?", "Yes", "yes, there is"), ("Is there a bus?", "No", "Yes")],
        "e3.png": [("Is there a tree?", "Yes", "I think so"), ("Is there a boat?", "No", "no.")],
    },
    "artwork": {
        "a1.jpg": [("Is this a painting?", "Yes", "No"), ("Is this a sculpture?", "No", "no")],
        "a2.jpg": [("Is this by Monet?", "Yes", "Yes"), ("Is this by Dali?", "No", "NO")],
    },
    "code_reasoning": {
        "c1.png": [("Does the code print 3?", "Yes", ""), ("Does the code print 4?", "No", "N/A")],
        "c2.png": [("Is this python code?", "Yes", " Yes\n"), ("Is this C code?", "No", "no")],
    },
}
REPLY = {(s, img, q): r for s, images in FIXTURE.items() for img, qs in images.items() for q, _, r in qs}


def _image_bytes(name: str) -> bytes:
    color = tuple(int(b) for b in name.encode()[:3].ljust(3, b"\0"))  # a distinct flat colour per name
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="JPEG" if name.endswith(".jpg") else "PNG", quality=95)
    return buf.getvalue()


def write_release(root: Path) -> Path:
    """MME_Benchmark_release_version/MME_Benchmark/<subtask>/..., one question file per image."""
    base = root / "MME_Benchmark_release_version"
    for subtask, images in FIXTURE.items():
        folder = base / "MME_Benchmark" / subtask
        split = subtask == "artwork"
        img_dir, qa_dir = (folder / "images", folder / "questions_answers_YN") if split else (folder, folder)
        img_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for name, qs in images.items():
            (img_dir / name).write_bytes(_image_bytes(name))
            (qa_dir / f"{Path(name).stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a, _ in qs) + "\n")
    return base


def write_eval_tool(root: Path) -> Path:
    """<subtask>.txt of image<TAB>question<TAB>answer lines; images in <subtask>/ (artwork: in images/)."""
    base = root / "eval_tool"
    for subtask, images in FIXTURE.items():
        img_dir = base / subtask / ("images" if subtask == "artwork" else "")
        img_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for name, qs in images.items():
            (img_dir / name).write_bytes(_image_bytes(name))
            lines += [f"{name}\t{q}\t{a}\n" for q, a, _ in qs]
        (base / f"{subtask}.txt").write_text("".join(lines))
    return base


def parquet_rows() -> list[dict]:
    return [{"question_id": f"{s}/{name}", "image": {"bytes": _image_bytes(name), "path": name},
             "question": q, "answer": a, "category": s}
            for s, images in FIXTURE.items() for name, qs in images.items() for q, a, _ in qs]


def write_parquet(root: Path) -> Path:
    """lmms-lab/MME style: a folder of two parquet shards."""
    rows = parquet_rows()
    (root / "data").mkdir(parents=True)
    pd.DataFrame(rows[:5]).to_parquet(root / "data" / "test-00000-of-00002.parquet")
    pd.DataFrame(rows[5:]).to_parquet(root / "data" / "test-00001-of-00002.parquet")
    return root


def replies_for(questions) -> list[str]:
    return [REPLY[q.subtask, q.image_id, q.question] for q in questions]


def test_parse_and_subtask_names():
    assert [parse_yes_no(r) for r in ("Yes.", "  no, it is not", "NO", "Maybe", "", "The answer is yes")] == \
        ["yes", "no", "no", "other", "other", "other"]
    assert canonical_subtask("ocr") == "OCR" and canonical_subtask("OCR") == "OCR"
    assert canonical_subtask("Commonsense Reasoning") == "commonsense_reasoning"
    assert canonical_subtask("poster") == "posters" and canonical_subtask("eval_tool") is None


def test_scores_by_hand_and_identical_across_layouts(tmp_path):
    release = load_mme(write_release(tmp_path / "rel"))
    assert len(release) == 14 and [q.subtask for q in release][:6] == ["existence"] * 6
    assert release[0].question_id == "existence/e1.png/0" and release[1].question_id == "existence/e1.png/1"
    assert release[0].answer == "Yes" and release[1].answer == "No"
    s = score_mme(release, replies_for(release))
    # existence: right e1 2, e2 1 (yes-question), e3 1 ("I think so" is other) -> 4/6; all right: e1 -> 1/3
    assert s["existence/acc"] == pytest.approx(100 * 4 / 6)
    assert s["existence/acc_plus"] == pytest.approx(100 * 1 / 3)
    assert s["existence/score"] == pytest.approx(100 * 4 / 6 + 100 * 1 / 3)  # = 100
    # artwork: a1 1 right, a2 2 right ("NO" parses) -> 3/4; all right: a2 -> 1/2
    assert (s["artwork/acc"], s["artwork/acc_plus"]) == pytest.approx((75.0, 50.0))
    # code_reasoning: c1 "" and "N/A" are other, c2 both right -> 2/4; all right: c2 -> 1/2
    assert (s["code_reasoning/acc"], s["code_reasoning/acc_plus"]) == pytest.approx((50.0, 50.0))
    assert s["perception"] == pytest.approx(100.0 + 125.0)
    assert s["cognition"] == pytest.approx(100.0)
    assert s["total"] == pytest.approx(325.0)
    keys = ("unparsed", "existence/unparsed", "artwork/unparsed", "code_reasoning/unparsed")
    unparsed = [s[k] for k in keys]
    assert unparsed == [3, 1, 0, 2]
    assert (s["questions"], s["images"]) == (14, 7)
    assert "count/score" not in s  # absent subtasks are not scored

    by_id = dict(zip((q.question_id for q in release), replies_for(release)))
    assert score_mme(release, by_id) == s  # replies keyed by question id
    with pytest.raises(ValueError, match="2 replies for 14 questions"):
        score_mme(release, ["yes", "no"])
    single = tmp_path / "mme.parquet"
    pd.DataFrame(parquet_rows()).to_parquet(single)
    for other in (load_mme(write_eval_tool(tmp_path / "tool")), load_mme(write_parquet(tmp_path / "pq")),
                  load_mme(single)):
        assert sorted(other, key=lambda q: q.question_id) == sorted(release, key=lambda q: q.question_id)
        assert score_mme(other, replies_for(other)) == s
    parquet = load_mme(tmp_path / "pq")
    for a, b in zip(release, parquet):
        assert isinstance(a.image, str) and isinstance(b.image, bytes)
        assert np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(b)))


def test_write_predictions_official_format_and_raw_replies(tmp_path):
    tool = write_eval_tool(tmp_path / "tool")
    questions = load_mme(tool)
    replies = replies_for(questions)
    files = write_predictions(tmp_path / "out", questions, replies)
    names = ["artwork.txt", "code_reasoning.txt", "existence.txt", "replies.jsonl"]
    assert sorted(p.name for p in files) == names

    def rows(subtask: str) -> list[list[str]]:
        text = (tmp_path / "out" / f"{subtask}.txt").read_text()
        return [line.split("\t") for line in text.split("\n") if line]

    assert rows("code_reasoning") == [
        ["c1.png", "Does the code print 3?", "Yes", ""], ["c1.png", "Does the code print 4?", "No", "N/A"],
        ["c2.png", "Is this python code?", "Yes", "Yes"], ["c2.png", "Is this C code?", "No", "no"]]
    raw = [json.loads(line) for line in (tmp_path / "out" / "replies.jsonl").read_text().splitlines()]
    assert [r["reply"] for r in raw] == replies  # untouched, newline included
    assert raw[-2]["reply"] == " Yes\n" and raw[-2]["parsed"] == "yes"
    # the 4-column files read back (the prediction column ignored) and their predictions score the same
    again = load_mme(tmp_path / "out", image_root=tool)
    assert again == questions
    preds = {(r[0], r[1]): r[3] for s in FIXTURE for r in rows(s)}
    assert score_mme(again, [preds[q.image_id, q.question] for q in again]) == score_mme(questions, replies)


def test_clear_errors(tmp_path):
    base = write_release(tmp_path / "rel")
    bad = base / "MME_Benchmark" / "existence" / "e2.txt"
    bad.write_text("Is there a car in the image?\tYes\nIs there a bus in the image? No\n")
    with pytest.raises(ValueError, match=r"e2\.txt:2: expected 'question<TAB>answer', got 1 tab field"):
        load_mme(base)
    tool = write_eval_tool(tmp_path / "tool")
    (tool / "artwork.txt").write_text("a1.jpg\tIs this a painting?\tYes\na1.jpg Is this a sculpture?\tNo\n")
    with pytest.raises(ValueError, match=r"artwork\.txt:2: expected 'image<TAB>question<TAB>answer"):
        load_mme(tool)
    (tool / "artwork.txt").write_text("a1.jpg\tIs this a painting?\tMaybe\n")
    with pytest.raises(ValueError, match=r"artwork\.txt:1: the answer must be Yes or No"):
        load_mme(tool)
    (tool / "artwork.txt").write_text("zz.jpg\tIs this a painting?\tYes\n")
    with pytest.raises(ValueError, match=r"artwork\.txt:1: image 'zz\.jpg' not found"):
        load_mme(tool)
    no_category = tmp_path / "nocat.parquet"
    pd.DataFrame(parquet_rows()).drop(columns=["category"]).to_parquet(no_category)
    with pytest.raises(ValueError, match=r"nocat\.parquet: missing column\(s\) \['category'\]"):
        load_mme(no_category)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unknown MME layout"):
        load_mme(tmp_path / "empty")
    pq = write_parquet(tmp_path / "pq")
    pd.DataFrame(parquet_rows()[:2]).to_parquet(pq / "data" / "copy.parquet")
    with pytest.raises(ValueError, match="already read from"):
        load_mme(pq)


def test_shapes_shards_give_the_written_mme_set(tmp_path):
    from data.shapes_cli import main

    out = tmp_path / "shapes"
    manifest = main(["--out", str(out), "--n", "8", "--n_val", "8", "--level", "demo", "--workers", "1"])
    shards = str(out / "val" / "shapes-val-000000.tar")
    questions = shapes_questions(shards)
    assert questions == load_mme(out / "val" / "mme")  # same records as the eval_tool files the CLI writes
    from_txt = load_mme(out / "val" / "mme")
    for a, b in zip(questions, from_txt):
        assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
        assert np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(b)))
    n_images = manifest["counts"]["mme_images"]
    assert {q.subtask for q in questions} == {s for s, n in n_images.items() if n}
    assert len(questions) == 2 * sum(n_images.values())
    # every image has one Yes and one No question: perfect replies score 200, all-"Yes" 50 + 0
    perfect = score_mme(questions, [q.answer for q in questions])
    always_yes = score_mme(questions, ["Yes"] * len(questions))
    for s in {q.subtask for q in questions}:
        assert perfect[f"{s}/score"] == 200.0 and always_yes[f"{s}/score"] == 50.0
    assert perfect["perception"] == 200.0 * len({q.subtask for q in questions}) and perfect["cognition"] == 0
    first3 = shapes_questions(shards, max_images=3)
    assert {q.image_id for q in first3} == {f"shapes-val-{i:08d}.png" for i in range(3)}
    assert first3 == [q for q in questions if q.image_id in {x.image_id for x in first3}]
