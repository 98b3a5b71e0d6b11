"""Shapes world: determinism, schema, GenEval format vs the real file, MME pairs, CLI layout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data import shapes_cli
from data.schema import check_sample, decode_image
from data.shapes import place_objects, render_sample, render_scene, scene_record
from data.shapes_cli import DatasetConfig, geneval_prompts, main, write_dataset
from data.shapes_config import MME_SUFFIX, NUMBERS, PLURALS, RELATIONS, TAGS, ShapesConfig, preset
from data.shapes_geometry import relative_position, robust_relations
from eval.shapes_scorer import evaluate, truth_detections
from unimllm.config import ConfigError, from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
REAL_GENEVAL = REPO / "eval" / "assets" / "geneval" / "evaluation_metadata.jsonl"  # vendored, MIT


def _cfg(level: str, size: int = 64) -> ShapesConfig:
    cfg = preset(level)
    cfg.image_size = size
    return cfg


# ----------------------------------------------------------------------------- config


def test_presets_are_valid_and_shaped_as_documented():
    demo, full = (from_dict(ShapesConfig, to_dict(preset(lv))) for lv in ("demo", "full"))
    assert demo.object_size[0] * 64 >= 16 and demo.max_objects == 3 and len(demo.colors) == 6
    assert demo.background == "plain"
    assert len(full.colors) == 10 and full.max_objects == 4 and full.background == "textured"


@pytest.mark.parametrize("override,key", [
    ({"background_color": [235, 235, 235]}, "background_color"),  # light grey next to white objects
    ({"colors": ["red", "teal"]}, "colors"),
    ({"shapes": ["circle"]}, "tag_weights"),  # two-class tags impossible
    ({"object_size": [0.5, 0.55], "max_objects": 4}, "object_size"),
    ({"tag_weights": {"counting": -1.0}}, "tag_weights"),
    # one object at most, but a tag whose scenes have two
    ({"max_objects": 1, "tag_weights": {"single_object": 1, "two_object": 1}}, "tag_weights"),
    ({"max_objects": 1, "tag_weights": {"colors": 1, "color_attr": 1}}, "tag_weights"),
    ({"max_objects": 1, "tag_weights": {"position": 1}}, "tag_weights"),
    ({"min_gap": -0.02}, "min_gap"),  # overlapping objects
    ({"min_gap": 0.0}, "min_gap"),  # touching squares read as one rectangle
    ({"margin": -0.05}, "margin"),  # objects outside the image
    ({"qa_turns": -1}, "qa_turns"),
    ({"position_margin": -0.1}, "position_margin"),
    ({"position_margin": 0.35}, "position_margin"),  # no layout satisfies the raised threshold and cutoff
    ({"background": "textured", "texture_amplitude": 40.0}, "texture_amplitude"),  # grey swings near white
    ({"background_jitter": 70}, "background_jitter"),
    ({"background_jitter": -1}, "background_jitter"),
])
def test_config_rejects_contradictions(override, key):
    with pytest.raises(ConfigError) as e:
        from_dict(ShapesConfig, {**to_dict(preset("demo")), **override})
    assert e.value.key == key, e.value


def test_background_check_counts_jitter_and_texture():
    full = to_dict(preset("full"))  # brown on grey: 111 apart; +-(12 + 2 * 6) of swing leaves 82 >= 80
    from_dict(ShapesConfig, full)
    with pytest.raises(ConfigError, match="'brown'") as e:
        from_dict(ShapesConfig, {**full, "texture_amplitude": 8.0})
    assert e.value.key == "texture_amplitude"
    from_dict(ShapesConfig, {**full, "background": "plain", "texture_amplitude": 8.0})  # texture unused


def test_tight_config_always_places_its_objects():
    """A config that validates never fails to place its objects (it used to raise after rejection sampling)."""
    tight = from_dict(ShapesConfig, {**to_dict(preset("demo")), "max_objects": 4, "object_size": [0.4, 0.44],
                                     "tag_weights": {"counting": 1, "position": 1}})
    side = float(tight.image_size)
    rng = np.random.default_rng(0)
    layouts = [place_objects(tight, rng, 4) for _ in range(3)]
    layouts += [place_objects(tight, rng, 2, rel) for rel in RELATIONS]
    for boxes in layouts:
        for j, a in enumerate(boxes):
            assert tight.margin * side - 1e-9 <= min(a) and max(a) <= side * (1 - tight.margin) + 1e-9
            assert 0.4 * side - 1e-9 <= a[2] - a[0] <= 0.44 * side + 1e-9
            for b in boxes[j + 1:]:
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= tight.min_gap * side - 1e-9
    for boxes, rel in zip(layouts[3:], RELATIONS):
        assert rel in robust_relations(boxes[1], boxes[0], tight.position_margin)
    for i in range(20):
        rec = scene_record(tight, "train", i)
        assert evaluate(truth_detections(rec["objects"]), rec["geneval"]) == (True, "")


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_seed_matters():
    cfg = _cfg("full")
    a, b = render_sample(cfg, "train", 7, seed=3), render_sample(cfg, "train", 7, seed=3)
    assert a == b
    assert render_sample(cfg, "train", 7, seed=4)["png"] != a["png"]


def test_train_and_val_streams_are_disjoint():
    cfg = _cfg("demo")
    digest = {split: {hashlib.sha1(render_sample(cfg, split, i)["png"]).hexdigest() for i in range(150)}
              for split in ("train", "val")}
    assert len(digest["train"]) == len(digest["val"]) == 150
    assert not digest["train"] & digest["val"]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_dataset_bytes_do_not_depend_on_workers(tmp_path):
    trees = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = DatasetConfig(out=str(out), n=40, n_val=12, shard_size=16, workers=workers, geneval_per_tag=4,
                            world=preset("full"))
        write_dataset(cfg, log=lambda s: None)
        trees.append(_tree_bytes(out))
    assert trees[0] == trees[1] and len(trees[0]) > 10


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("level,size,n", [("demo", 64, 120), ("full", 64, 120), ("demo", 256, 12), ("full", 256, 12)])
def test_samples_valid_and_match_their_prompt(level, size, n):
    cfg = _cfg(level, size)
    side, gap = float(size), cfg.min_gap * size
    for i in range(n):
        sample = render_sample(cfg, "val", i)
        assert check_sample(sample) == []
        assert decode_image(sample["png"]).size == (size, size)
        rec = json.loads(sample["json"])
        meta, objs = rec["geneval"], rec["objects"]
        assert rec["prompt"] == meta["prompt"]
        # exactly the objects the prompt implies
        assert evaluate(truth_detections(objs), meta) == (True, "")
        assert len(objs) == sum(c["count"] for c in meta["include"])
        assert Counter(o["shape"] for o in objs) == Counter({c["class"]: c["count"] for c in meta["include"]})
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert cfg.object_size[0] * side - 0.02 <= x1 - x0 <= cfg.object_size[1] * side + 0.02
            inner = cfg.margin * side - 0.02  # inside the image, margin included
            assert inner <= x0 and x1 <= side - inner and inner <= y0 and y1 <= side - inner
            assert o["color"] in cfg.colors and o["shape"] in cfg.shapes
        for j, a in enumerate(objs):  # never overlapping, always a gap
            for b in objs[j + 1:]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= gap - 0.02
        if meta["tag"] == "position":
            rel = meta["include"][1]["position"][0]
            assert rel in robust_relations(objs[1]["bbox"], objs[0]["bbox"], cfg.position_margin)
        # the caption names every object and the object count
        cap = rec["caption"]
        assert cap.lower().startswith(NUMBERS[len(objs)])
        for o in objs:
            assert f"{o['color']} {o['shape']}" in cap
        conv = rec["conversations"]
        assert conv[0] == {"from": "human", "value": "<image>\nDescribe the image."}
        assert conv[1] == {"from": "gpt", "value": cap}
        n_mme = sum(len(pairs) for pairs in rec["mme"].values())  # the pool holds these and >= 1 count question
        assert len(conv) % 2 == 0 and 2 + 2 * min(cfg.qa_turns, n_mme + 1) <= len(conv) <= 2 + 2 * cfg.qa_turns
        for question, answer in zip(conv[2::2], conv[3::2]):  # every answer is the ground truth
            assert (question["from"], answer["from"]) == ("human", "gpt")
            assert answer["value"] == _qa_truth(question["value"], objs, cfg.position_margin), question


def test_shape_questions_need_the_shape_and_are_training_only():
    """shape_questions: "What shape is the <colour> object?" and an existence pair whose two questions differ only
    in the shape (colour present in both), in the conversations and never in the ``mme`` pairs."""
    cfg = dataclasses.replace(_cfg("demo", 64), qa_turns=30, shape_questions=True)
    pairs = 0
    for i in range(40):
        rec = json.loads(render_sample(cfg, "train", i)["json"])
        objs, conv = rec["objects"], rec["conversations"]
        asked = dict(zip([t["value"] for t in conv[2::2]], [t["value"] for t in conv[3::2]]))
        assert len(asked) == len(conv[2::2])  # no question twice
        colors = [o["color"] for o in objs]
        assert {q for q in asked if q.startswith("What shape")} == {
            f"What shape is the {c} object?" for c in colors if colors.count(c) == 1}
        exist = [re.fullmatch(r"Is there an? (\w+) (\w+) in the image\? Please answer yes or no\.", q) for q in asked]
        by_color: dict = {}
        for m in filter(None, exist):
            by_color.setdefault(m.group(1), set()).add((m.group(2), asked[m.group(0)]))
        pairs += any({a for _, a in v} == {"Yes", "No"} for v in by_color.values())  # same colour, shape decides
        mme = {q["question"] for v in rec["mme"].values() for q in v}
        assert not any(q.startswith("What shape") for q in mme)
        off = dataclasses.replace(cfg, shape_questions=False)
        assert not any(t["value"].startswith("What shape") for t in json.loads(render_sample(off, "train", i)["json"])["conversations"])
    assert pairs >= 30


def test_qa_pairs_both_asks_whole_pairs_one_never_both():
    for mode in ("both", "one"):
        cfg = dataclasses.replace(_cfg("demo", 64), qa_turns=20, qa_pairs=mode)
        for i in range(20):
            rec = json.loads(render_sample(cfg, "val", i)["json"])
            asked = {t["value"] for t in rec["conversations"][2::2]}
            for pair in rec["mme"].values():
                assert sum(q["question"] in asked for q in pair) == (len(pair) if mode == "both" else 1)


def _qa_truth(q: str, objs: list[dict], margin: float) -> str:
    """Independent oracle for the open questions of a conversation (MME questions: _mme_truth)."""
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        shape = next(s for s, plural in PLURALS.items() if plural == m.group(1))
        return NUMBERS[sum(o["shape"] == shape for o in objs)].capitalize() + "."
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        (o,) = _find(objs, m.group(1))  # only asked about a shape that is unique in the image
        return o["color"].capitalize() + "."
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (o,) = [o for o in objs if o["color"] == m.group(1)]  # only asked about a colour that is unique
        return o["shape"].capitalize() + "."
    return _mme_truth(q, objs, margin)


# ----------------------------------------------------------------------------- GenEval format


def _real_rows() -> list[dict]:
    return [json.loads(line) for line in REAL_GENEVAL.read_text().splitlines()]


def _signature(meta: dict) -> tuple:
    """Key order of the line and of every clause: the schema GenEval's harness reads."""
    return (tuple(meta), tuple(tuple(c) for c in meta["include"]), tuple(tuple(c) for c in meta.get("exclude", [])))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _template(meta: dict, plural) -> str:
    """The prompt GenEval's templates give for this metadata (shared by the real file and ours)."""
    inc = meta["include"]
    name = [f"{c['color']} {c['class']}" if "color" in c else c["class"] for c in inc]
    tag = meta["tag"]
    if tag == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {plural(inc[0]['class'])}"
    if tag == "position":
        return f"a photo of {_a(name[1])} {name[1]} {inc[1]['position'][0]} {_a(name[0])} {name[0]}"
    return "a photo of " + " and ".join(f"{_a(n)} {n}" for n in name)


def _check_tag_rules(meta: dict) -> None:
    inc, tag = meta["include"], meta["tag"]
    if tag == "counting":
        assert meta["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        assert 2 <= inc[0]["count"] <= 4
    else:
        assert all(c["count"] == 1 for c in inc)
    if len(inc) == 2:
        assert inc[0]["class"] != inc[1]["class"]
    if tag == "position":
        assert inc[1]["position"][1] == 0 and inc[1]["position"][0] in ("left of", "right of", "above", "below")
    if tag == "color_attr":
        assert inc[0]["color"] != inc[1]["color"]


def test_geneval_format_matches_the_real_file():
    real = _real_rows()
    real_sigs: dict[str, set] = {}
    for row in real:
        real_sigs.setdefault(row["tag"], set()).add(_signature(row))
        _check_tag_rules(row)
        if row["tag"] != "counting":  # the real file's plurals are irregular (buses)
            assert _template(row, None) == row["prompt"]
    assert set(real_sigs) == set(TAGS)
    ours = [render_scene(_cfg(lv), "train", i).record["geneval"] for lv in ("demo", "full") for i in range(200)]
    ours += geneval_prompts(preset("full"), 20, seed=1)
    assert {m["tag"] for m in ours} == set(TAGS)
    for meta in ours:
        assert _signature(meta) in real_sigs[meta["tag"]], meta
        _check_tag_rules(meta)
        assert _template(meta, PLURALS.get) == meta["prompt"]
        assert json.loads(json.dumps(meta)) == meta


def test_geneval_prompt_file_is_balanced_and_deduplicated():
    prompts = geneval_prompts(preset("full"), 30, seed=0)
    by_tag = Counter(m["tag"] for m in prompts)
    assert by_tag == Counter(dict.fromkeys(TAGS, 30))
    # distinct prompts per tag with 3 shapes, 10 colours, counts 2-4 (ordered pairs of classes)
    n_distinct = {"single_object": 3, "two_object": 6, "counting": 9, "colors": 30, "position": 24,
                  "color_attr": 540}
    for tag in TAGS:
        texts = [m["prompt"] for m in prompts if m["tag"] == tag]
        # unique while the tag has enough distinct prompts, then all of them, cycled
        assert len(set(texts)) == min(30, n_distinct[tag])
        assert texts[: len(set(texts))] == list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------- MME


def _find(objs: list[dict], phrase: str) -> list[dict]:
    words = phrase.split()
    return [o for o in objs if o["shape"] == words[-1] and (len(words) == 1 or o["color"] == words[0])]


def _mme_truth(q: str, objs: list[dict], margin: float) -> str:
    """Independent oracle for the four MME question templates."""
    q = q.removesuffix(MME_SUFFIX)
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        return "Yes" if any((o["color"], o["shape"]) == m.groups() for o in objs) else "No"
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\w+) (\w+) in the image\?", q):
        shape = m.group(2).removesuffix("s")
        return "Yes" if sum(o["shape"] == shape for o in objs) == NUMBERS.index(m.group(1)) else "No"
    if m := re.fullmatch(r"Is the ((?:\w+ )?\w+) (to the left of|to the right of|above|below) the ((?:\w+ )?\w+)\?", q):
        a, b = _find(objs, m.group(1)), _find(objs, m.group(3))
        assert len(a) == len(b) == 1, q  # uniquely identified
        rel = m.group(2).removeprefix("to the ")
        rels = relative_position(a[0]["bbox"], b[0]["bbox"])
        if rel in rels:
            assert rel in robust_relations(a[0]["bbox"], b[0]["bbox"], margin), q  # unambiguous
        return "Yes" if rel in rels else "No"
    if m := re.fullmatch(r"Is the (\w+) (\w+)\?", q):
        (o,) = _find(objs, m.group(1))  # the shape is unique in the image
        return "Yes" if o["color"] == m.group(2) else "No"
    raise AssertionError(f"unknown MME template: {q}")


@pytest.mark.parametrize("level", ["demo", "full"])
def test_mme_pairs_are_one_yes_one_no_and_true(level):
    cfg = _cfg(level)
    asked = Counter()
    for i in range(150):
        rec = render_scene(cfg, "val", i).record
        assert set(rec["mme"]) <= {"existence", "count", "position", "color"}
        for subtask, pair in rec["mme"].items():
            asked[subtask] += 1
            assert [q["answer"] for q in pair] == ["Yes", "No"]
            for q in pair:
                assert q["question"].endswith(MME_SUFFIX)
                assert _mme_truth(q["question"], rec["objects"], cfg.position_margin) == q["answer"], q
    assert set(asked) == {"existence", "count", "position", "color"}, asked  # every subtask is asked ...
    assert min(asked.values()) >= 40, asked  # ... often


# ----------------------------------------------------------------------------- command line


def test_cli_writes_the_documented_layout(tmp_path):
    out = tmp_path / "ds"
    manifest = main(["--out", str(out), "--n", "20", "--n_val", "8", "--level", "full", "--seed", "3",
                     "--workers", "1", "--shard-size", "8", "--world.max_objects", "3", "--geneval-per-tag", "5"])
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"shapes-train-{i:06d}.tar" for i in range(3)]
    assert [p.name for p in (out / "val").glob("*.tar")] == ["shapes-val-000000.tar"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["config"]["world"]["max_objects"] == 3 and len(on_disk["config"]["world"]["colors"]) == 10
    assert on_disk["level"] == "full" and on_disk["seeds"]["val"] == [3, 1] and on_disk == manifest
    lines = (out / "val" / "geneval_prompts.jsonl").read_text().splitlines()
    assert len(lines) == 30 and all(json.loads(line)["tag"] in TAGS for line in lines)
    for subtask, n_images in manifest["counts"]["mme_images"].items():
        rows = [r.split("\t") for r in (out / "val" / "mme" / f"{subtask}.txt").read_text().splitlines()]
        assert len(rows) == 2 * n_images > 0
        for name, question, answer in rows:
            assert (out / "val" / "mme" / subtask / name).is_file() and answer in ("Yes", "No")
            assert question.endswith(MME_SUFFIX)
        assert all(Counter(n for n, _, _ in rows)[n] == 2 for n, _, _ in rows)


@pytest.mark.parametrize("args,names", [
    (["--n", "3"], "command line: out: an output directory is required"),
    (["--world.colour", "red"], "command line: world.colour: unknown key (did you mean 'colors'?)"),
    (["--world.background_color", "240,240,240"], "world.background_color: the background"),
    (["--level", "hard"], "command line: level: expected one of 'demo', 'full', got 'hard'"),
    (["--seed", "-1"], "seed: must be >= 0"),
    (["--world.max_objects", "1"], "world.tag_weights: tag 'two_object' needs 2 shapes and max_objects >= 2"),
])
def test_cli_errors_exit_2(tmp_path, capsys, args, names):
    argv = args if args[0] == "--n" else ["--out", str(tmp_path / "ds"), *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and names in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()


def test_yaml_level_error_names_the_file(tmp_path, capsys):
    yaml_file = tmp_path / "shapes.yaml"
    yaml_file.write_text("level: hard\nn: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(yaml_file), "--out", str(tmp_path / "ds")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{yaml_file}: level: expected one of 'demo', 'full', got 'hard'" in err and "command line" not in err


def _small(out, **kw) -> DatasetConfig:
    return DatasetConfig(out=str(out), n=6, n_val=4, shard_size=4, workers=1, geneval_per_tag=2, **kw)


def test_bad_config_leaves_the_old_dataset_alone(tmp_path):
    out = tmp_path / "ds"
    write_dataset(_small(out), log=lambda s: None)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = preset("demo")
    bad.position_margin = 0.35  # passes the type checks; no position scene can satisfy it
    with pytest.raises(ConfigError, match="position_margin"):
        write_dataset(_small(out, world=bad), log=lambda s: None)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_failed_rerun_leaves_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    write_dataset(_small(out), log=lambda s: None)
    assert (out / "manifest.json").is_file() and (out / "val/geneval_prompts.jsonl").is_file()

    def render_or_fail(cfg, split, index, seed=0):
        if index == 5:
            raise OSError("disk full (simulated)")
        return render_sample(cfg, split, index, seed)

    monkeypatch.setattr(shapes_cli, "render_sample", render_or_fail)
    with pytest.raises(OSError, match="simulated"):
        write_dataset(_small(out), log=lambda s: None)
    # no completion marker and no prompt file that would describe the earlier run
    assert not (out / "manifest.json").exists() and not (out / "val/geneval_prompts.jsonl").exists()
    assert [p.name for p in (out / "train").iterdir()] == ["shapes-train-000000.tar"]


def test_python_m_data_shapes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "data.shapes", "--out", str(tmp_path), "--n", "3", "--n_val", "2",
                          "--workers", "1", "--image_size", "32", "--world.object_size", "0.3,0.4"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["world"]["image_size"] == 32 and manifest["counts"]["train"] == 3


def test_images_scale_with_image_size():
    small, big = render_scene(_cfg("full", 64), "train", 5), render_scene(_cfg("full", 256), "train", 5)
    assert big.image.shape == (256, 256, 3) and small.image.shape == (64, 64, 3)
    assert small.record["mme"] == big.record["mme"]


@pytest.mark.parametrize("level", ["demo", "full"])
def test_same_text_at_64_and_256_px(level):
    """The prompt, caption, MME pairs and conversation of a scene do not depend on the image size
    (demo train 222 used to lose its position question at 64 px: relations came from rounded boxes)."""
    small, big = _cfg(level, 64), _cfg(level, 256)
    for i in range(300):
        a, b = scene_record(small, "train", i), scene_record(big, "train", i)
        for key in ("geneval", "caption", "mme", "conversations"):
            assert a[key] == b[key], (i, key)
        for oa, ob in zip(a["objects"], b["objects"]):
            assert np.allclose(np.array(oa["bbox"]) * 4, ob["bbox"], atol=0.03)
    assert scene_record(big, "train", 5) == render_scene(big, "train", 5).record
