"""GenEval harness: official summary rule, layout writer, shapes scorer path, scorer hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shapes import place_objects, render_background, render_image
from data.shapes_config import preset
from data.shapes_text import sample_geneval_spec
from eval.geneval import (
    OFFICIAL_PROMPTS,
    RESULT_KEYS,
    generate_layout,
    read_prompts,
    run_scorer,
    sample_seed,
    score_shapes_layout,
    scorer_command,
    summarize_results,
)


def _row(tag: str, prompt: str, correct: bool) -> dict:
    meta = {"tag": tag, "include": [{"class": prompt, "count": 1}], "prompt": f"a photo of a {prompt}"}
    return {"filename": f"x/{prompt}.png", "tag": tag, "prompt": meta["prompt"], "correct": correct,
            "reason": "", "metadata": json.dumps(meta), "details": "{}"}


def test_summary_follows_the_official_rule(tmp_path):
    T, F = True, False
    verdicts = {  # (tag, prompt) -> per-image verdicts; prompt "b" has 2 samples, the rest 4
        ("single_object", "a"): [T, T, T, F], ("single_object", "b"): [T, F],
        ("two_object", "c"): [T, F, F, F], ("counting", "d"): [F, F, F, F], ("colors", "e"): [T, T, T, T],
        ("position", "f"): [T, F, T, F], ("color_attr", "g"): [F, F, F, T],
    }
    rows = [_row(t, p, v) for (t, p), vs in verdicts.items() for v in vs]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = summarize_results(path)
    # per-image fraction per tag (4/6, not the per-prompt mean (3/4 + 1/2) / 2 = 0.625)
    assert rep["tags"] == pytest.approx({"single_object": 4 / 6, "two_object": 0.25, "counting": 0.0,
                                         "colors": 1.0, "position": 0.5, "color_attr": 0.25})
    assert list(rep["tags"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert rep["overall"] == pytest.approx(4 / 9)  # (2/3 + 0.25 + 0 + 1 + 0.5 + 0.25) / 6
    assert (rep["n_images"], rep["n_prompts"]) == (26, 7)
    assert rep["counts"]["single_object"] == [4, 6]
    assert rep["image_accuracy"] == pytest.approx(12 / 26)
    assert rep["prompt_any_correct"] == pytest.approx(6 / 7)  # only the counting prompt has no correct image
    assert rep["missing_tags"] == []

    # a subset of tags: overall is the mean over the tags present, and the missing ones are listed
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["tag"] in ("colors", "counting")))
    rep = summarize_results(path)
    assert rep["overall"] == pytest.approx(0.5) and rep["n_prompts"] == 2
    assert rep["missing_tags"] == ["single_object", "two_object", "position", "color_attr"]

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"tag": "colors"}) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2"):
        summarize_results(path)


def test_read_prompts_official_file_and_errors(tmp_path):
    prompts = read_prompts(OFFICIAL_PROMPTS)
    assert len(prompts) == 553
    assert prompts[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                          "prompt": "a photo of a bench"}
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(prompts[0]) + "\n" + json.dumps({"tag": "colors", "include": []}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing or non-str 'prompt'"):
        read_prompts(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: not a JSON line"):
        read_prompts(bad)


# ----------------------------------------------------------------------------- layout

PROMPTS = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
            "prompt": f"prompt {i}"} for i in range(5)]


class FakeGenerator:
    """Deterministic: the image is drawn from the seed alone; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []

    def __call__(self, texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        self.calls.append((list(texts), list(seeds)))
        return [np.random.default_rng(s).integers(0, 256, (8, 8, 3), dtype=np.uint8) for s in seeds]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_layout_writes_resumes_and_shards(tmp_path):
    out, gen = tmp_path / "a", FakeGenerator()
    res = generate_layout(out, PROMPTS, gen, n_samples=3, seed=7, batch=4, manifest={"cfg_scale": 3.0})
    assert res == {"prompts": 5, "skipped": 0, "generated": 5, "images": 15}
    assert [len(s) for _, s in gen.calls] == [4, 4, 4, 3]
    files = _files(out)
    expected = {f"{i:05d}/samples/{j:04d}.png" for i in range(5) for j in range(3)}
    assert set(files) == expected | {f"{i:05d}/metadata.jsonl" for i in range(5)} | {"manifest.json"}
    for i in range(5):
        assert json.loads(files[f"{i:05d}/metadata.jsonl"]) == PROMPTS[i]
        for j in range(3):
            img = np.asarray(Image.open(out / f"{i:05d}/samples/{j:04d}.png"))
            assert np.array_equal(img, gen([""], [sample_seed(7, i, j)])[0])
    man = json.loads(files["manifest.json"])
    assert (man["n_samples"], man["seed"], man["sampler"], man["n_prompts"]) == (3, 7, {"cfg_scale": 3.0}, 5)
    assert len(man["prompts_sha256"]) == 64 and man["seed_rule"] and man["format"]

    gen2 = FakeGenerator()  # everything complete: nothing generated, nothing rewritten
    assert generate_layout(out, PROMPTS, gen2, n_samples=3, seed=7, manifest={"cfg_scale": 3.0})["skipped"] == 5
    assert gen2.calls == [] and _files(out) == files

    (out / "00003/samples/0001.png").unlink()  # one sample lost: only prompt 3 is redone, identically
    gen3 = FakeGenerator()
    res = generate_layout(out, PROMPTS, gen3, n_samples=3, seed=7, manifest={"cfg_scale": 3.0})
    assert (res["skipped"], res["generated"], res["images"]) == (4, 1, 3)
    assert gen3.calls == [(["prompt 3"] * 3, [sample_seed(7, 3, j) for j in range(3)])]
    assert _files(out) == files

    with pytest.raises(ValueError, match="other settings"):  # resuming with other settings is refused
        generate_layout(out, PROMPTS, gen3, n_samples=3, seed=8, manifest={"cfg_scale": 3.0})

    # two ranks with batch 1 cover every prompt once and write the same bytes as one rank with batch 4
    sharded, gen4 = tmp_path / "b", FakeGenerator()
    r0 = generate_layout(sharded, PROMPTS, gen4, n_samples=3, seed=7, rank=0, world_size=2, batch=1,
                         manifest={"cfg_scale": 3.0})
    r1 = generate_layout(sharded, PROMPTS, gen4, n_samples=3, seed=7, rank=1, world_size=2, batch=1,
                         manifest={"cfg_scale": 3.0})
    assert (r0["generated"], r1["generated"]) == (3, 2)
    assert sorted(t for texts, _ in gen4.calls for t in texts) == sorted(f"prompt {i}" for i in range(5) for _ in range(3))
    assert _files(sharded) == files


def test_half_written_prompt_is_redone(tmp_path):
    out = tmp_path / "a"
    generate_layout(out, PROMPTS[:2], FakeGenerator(), n_samples=2)
    (out / "00001/metadata.jsonl").unlink()  # a crash before metadata: the folder counts as unfinished
    (out / "00001/samples/.tmp-0001.png").write_bytes(b"partial")
    res = generate_layout(out, PROMPTS[:2], FakeGenerator(), n_samples=2)
    assert (res["skipped"], res["generated"]) == (1, 1)
    assert (out / "00001/metadata.jsonl").is_file() and not list(out.rglob(".tmp-*"))
    with pytest.raises(ValueError, match="uint8"):
        generate_layout(tmp_path / "c", PROMPTS[:1], lambda t, s: [np.zeros((8, 8, 3))] * len(s))


# ----------------------------------------------------------------------------- shapes scorer path


def test_score_shapes_layout_matched_beats_shuffled(tmp_path):
    world = preset("demo")
    rng = np.random.default_rng(0)
    specs = [sample_geneval_spec(world, rng, tag) for tag in
             ("single_object", "two_object", "counting", "colors", "position", "color_attr") for _ in range(3)]
    objects = {meta["prompt"]: (meta, objs) for meta, objs in specs}

    def draw(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """A perfect generator: places and paints the prompt's objects with the seed's RNG."""
        out = []
        for text, seed in zip(texts, seeds):
            meta, objs = objects[text]
            r = np.random.default_rng(seed)
            rel = meta["include"][1]["position"][0] if meta["tag"] == "position" else None
            boxes = place_objects(world, r, len(objs), rel)
            scene = [{"shape": s, "color": c, "bbox": b} for (s, c), b in zip(objs, boxes)]
            out.append(render_image(world, scene, render_background(world, r)))
        return out

    layout = tmp_path / "images"
    generate_layout(layout, [m for m, _ in specs], draw, n_samples=2)
    rep, ctrl = score_shapes_layout(layout, tmp_path / "results.jsonl", seed=0)
    assert rep["tags"] == dict.fromkeys(rep["tags"], 1.0) and rep["overall"] == 1.0
    assert (rep["n_images"], ctrl["n_images"]) == (36, 36)
    assert rep["missing_tags"] == [] and ctrl["overall"] < 0.6
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    shuffled = (tmp_path / "results_shuffled.jsonl").read_text().splitlines()
    assert len(lines) == len(shuffled) == 36
    first = json.loads(lines[0])
    assert tuple(first) == RESULT_KEYS
    assert first["filename"] == str(layout / "00000" / "samples" / "0000.png")
    assert json.loads(first["metadata"]) == specs[0][0] and first["correct"] is True
    assert all(len(box) == 5 for boxes in json.loads(first["details"]).values() for box in boxes)
    # the control scores the same images against another prompt of the same tag
    for a, b in zip(map(json.loads, lines), map(json.loads, shuffled)):
        assert a["filename"] == b["filename"] and a["tag"] == b["tag"]


# ----------------------------------------------------------------------------- official scorer hook


def test_scorer_command_and_missing_files(tmp_path):
    argv = scorer_command("/env/bin/python", "/opt/geneval", "/imgs", "/res/results.jsonl", "/ckpt",
                          options={"max_objects": 16, "clip_model": "ViT-L-14"})
    assert argv == ["/env/bin/python", "/opt/geneval/evaluation/evaluate_images.py", "/imgs",
                    "--outfile", "/res/results.jsonl", "--model-path", "/ckpt",
                    "--options", "max_objects=16", "clip_model=ViT-L-14"]
    assert scorer_command("py", "g", "i", "o", "m")[-2:] == ["--model-path", "m"]
    with pytest.raises(ValueError, match="unknown evaluate_images.py options"):
        scorer_command("py", "g", "i", "o", "m", options={"treshold": 0.3})

    with pytest.raises(FileNotFoundError, match="evaluate_images.py not found"):
        run_scorer("py", tmp_path, tmp_path, tmp_path / "r.jsonl", tmp_path)
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "evaluate_images.py").write_text("")
    with pytest.raises(FileNotFoundError, match="mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"):
        run_scorer("py", tmp_path, tmp_path, tmp_path / "r.jsonl", tmp_path / "ckpt")
