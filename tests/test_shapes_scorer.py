"""Shapes scorer: GenEval rules on hand-made detections, agreement with ground truth (printed)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from data.shapes import render_scene
from data.shapes_config import preset
from data.shapes_geometry import relative_position
from eval.shapes_scorer import (
    Detection,
    ScorerConfig,
    agrees,
    degrade,
    detect,
    evaluate,
    score,
    truth_detections,
)
from unimllm.config import ConfigError, from_dict

# (level, image size, images): >= 300 images over both levels and both sizes
SETS = [("demo", 64, 160), ("full", 64, 160), ("demo", 256, 20), ("full", 256, 20)]


def det(shape: str, color: str, box, conf: float = 1.0) -> Detection:
    return Detection(shape, color, tuple(float(v) for v in box), 0.0, conf)


def meta(tag: str, include: list, exclude: list | None = None) -> dict:
    out = {"tag": tag, "include": include}
    if exclude is not None:
        out["exclude"] = exclude
    return out | {"prompt": "-"}


# ----------------------------------------------------------------------------- GenEval rules


def test_relative_position_threshold_and_cutoff():
    a = (0, 0, 10, 10)
    assert relative_position(a, (12, 0, 22, 10)) == {"left of"}  # offset -12, shrunk by 0.1 * 20 -> -10
    assert relative_position((12, 0, 22, 10), a) == {"right of"}
    assert relative_position(a, (2, 0, 12, 10)) == set()  # |offset| 2 <= 0.1 * (10 + 10): no relation
    assert relative_position(a, (3.5, 0, 13.5, 10)) == set()  # shrunk 1.5 / full 3.5 = 0.43 < cutoff 0.5
    assert relative_position(a, (4.5, 0, 14.5, 10)) == {"left of"}  # 2.5 / 4.5 = 0.56
    assert relative_position(a, (15, 15, 25, 25)) == {"left of", "above"}  # diagonal: both (-13 / 21.2)
    assert relative_position(a, (10, 6, 20, 16)) == {"left of"}  # dy: (6 - 2) / 11.7 = 0.34 < 0.5
    assert relative_position((0, 20, 10, 30), a) == {"below"}  # y grows downwards
    assert relative_position(a, (12, 0, 22, 10), threshold=0.6) == set()


def test_include_count_and_exclude_semantics():
    counting = meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    two = {"circle": [det("circle", "red", (0, 0, 5, 5)), det("circle", "blue", (10, 0, 15, 5))]}
    assert evaluate(two, counting) == (True, "")
    three = {"circle": two["circle"] + [det("circle", "red", (20, 0, 25, 5), 0.1)]}
    ok, reason = evaluate(three, counting)  # exclude counts every detection, not just the top ones
    assert not ok and reason == "expected circle<3, found 3"
    ok, reason = evaluate({"circle": two["circle"][:1]}, counting)
    assert not ok and reason == "expected circle>=2, found 1"
    # include only asks for at least `count`: extra objects of another class do not matter
    single = meta("single_object", [{"class": "square", "count": 1}])
    assert evaluate({"square": [det("square", "red", (0, 0, 5, 5))], **two}, single)[0]
    assert not evaluate(two, single)[0]


def test_color_is_checked_on_the_most_confident_detections():
    red_square = meta("colors", [{"class": "square", "count": 1, "color": "red"}])
    blue_first = {"square": [det("square", "blue", (0, 0, 5, 5), 0.9), det("square", "red", (9, 0, 14, 5), 0.8)]}
    ok, reason = evaluate(blue_first, red_square)
    assert not ok and reason == "expected red square>=1, found 0 red; and 1 blue"
    red_first = {"square": blue_first["square"][::-1]}
    assert evaluate(red_first, red_square) == (True, "")
    # two red squares wanted, one red among the top two
    two_red = meta("counting", [{"class": "square", "count": 2, "color": "red"}])
    assert not evaluate(blue_first, two_red)[0]


def test_position_clause_and_missing_target():
    prompt = meta("position", [{"class": "square", "count": 1},
                               {"class": "circle", "count": 1, "position": ["right of", 0]}])
    square = det("square", "red", (0, 0, 10, 10))
    assert evaluate({"square": [square], "circle": [det("circle", "blue", (20, 0, 30, 10))]}, prompt)[0]
    ok, reason = evaluate({"square": [square], "circle": [det("circle", "blue", (0, 20, 10, 30))]}, prompt)
    assert not ok and reason == "expected circle right of target, found below target"
    ok, reason = evaluate({"circle": [det("circle", "blue", (20, 0, 30, 10))]}, prompt)
    assert not ok and reason.splitlines() == ["expected square>=1, found 0", "no target for circle to be right of"]
    # the target group fails its colour clause -> no target for the position clause
    colored = meta("position", [{"class": "square", "count": 1, "color": "green"},
                                {"class": "circle", "count": 1, "position": ["right of", 0]}])
    ok, reason = evaluate({"square": [square], "circle": [det("circle", "blue", (20, 0, 30, 10))]}, colored)
    assert not ok and reason.endswith("no target for circle to be right of")


# ----------------------------------------------------------------------------- detection


def test_blank_image_has_no_detections_and_inputs_are_flexible(tmp_path):
    assert detect(np.full((64, 64, 3), 128, np.uint8)) == {}
    scene = render_scene(preset("demo"), "val", 3)
    path = tmp_path / "x.png"
    Image.fromarray(scene.image).save(path)
    expected = score(scene.image, scene.record["geneval"])
    assert expected[0] and score(Image.fromarray(scene.image), scene.record["geneval"]) == expected
    assert score(path, scene.record["geneval"]) == expected


def test_image_dtypes_are_checked():
    scene = render_scene(preset("demo"), "val", 3)
    assert score(scene.image, scene.record["geneval"])[0]
    # integer arrays in 0..255 are fine (e.g. after np.rint); they are the same image
    assert score(scene.image.astype(np.int64), scene.record["geneval"])[0]
    # a float image is refused, never silently mis-scored ([0, 1] used to give "no objects")
    for floats in (scene.image / 255.0, scene.image.astype(np.float32)):
        with pytest.raises(ValueError, match="expected a uint8 image .* got dtype float"):
            detect(floats)
    with pytest.raises(ValueError, match="values in 0..255"):
        detect(scene.image.astype(np.int16) * 2)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect(scene.image[..., 0])


@pytest.mark.parametrize("override,key", [
    ({"colors": []}, "colors"),
    ({"shapes": []}, "shapes"),
    ({"shapes": ["circle", "hexagon"]}, "shapes"),
    ({"colors": ["red", "teal"]}, "colors"),
    ({"colors": ["red", "red"]}, "colors"),
    ({"min_fit": 1.2}, "min_fit"),  # a soft IoU never exceeds 1: nothing would be detected
    ({"max_aspect": 0.8}, "max_aspect"),  # no bounding box is that "elongated": nothing would be detected
    ({"min_area": 1.5}, "min_area"),
    ({"max_objects": 0}, "max_objects"),
    ({"border": 0.0}, "border"),
    ({"alpha_threshold": 1.0}, "alpha_threshold"),
])
def test_scorer_config_is_validated(override, key):
    with pytest.raises(ConfigError) as e:
        from_dict(ScorerConfig, override)
    assert e.value.key == key, e.value
    with pytest.raises(ConfigError) as e:  # a config built in code is checked when it is used
        detect(np.full((64, 64, 3), 128, np.uint8), ScorerConfig(**override))
    assert e.value.key == key


@pytest.fixture(scope="module")
def scenes():
    out = {}
    for level, size, n in SETS:
        cfg = preset(level)
        cfg.image_size = size
        out[(level, size)] = [render_scene(cfg, "val", i) for i in range(n)]
    return out


def _report(capsys, title: str, rows: dict) -> None:
    with capsys.disabled():  # show the numbers in the normal pytest output
        print(f"\n[shapes scorer] {title}: " + ", ".join(f"{k} {v}" for k, v in rows.items()))


@pytest.mark.parametrize("condition", ["clean", "blur+noise"])
def test_scorer_agrees_with_ground_truth(scenes, condition, capsys):
    """Strict agreement: detected (shape, colour) multiset == truth AND its own prompt scores True."""
    rows, total, good = {}, 0, 0
    for (level, size), group in scenes.items():
        ok = 0
        for sc in group:
            img = sc.image
            if condition == "blur+noise":  # sigma 1 px at 64 px, scaled with the image
                img = degrade(img, size / 64, 8.0, np.random.default_rng(sc.record["index"]))
            ok += agrees(img, sc.record)[0]
        rows[f"{level}@{size}"] = f"{ok}/{len(group)}"
        total, good = total + len(group), good + ok
    rows["all"] = f"{good}/{total} = {good / total:.1%}"
    _report(capsys, f"agreement ({condition})", rows)
    assert total >= 300
    assert good / total >= (0.99 if condition == "clean" else 0.95)


def test_scorer_rejects_other_images_prompts(scenes, capsys):
    """Each image vs the prompt of the next image with the same tag: the verdict must match the
    verdict of GenEval's rules on the ground truth; where the truth fails, the scorer must fail."""
    agree = n = false_truth = rejected = 0
    for group in scenes.values():
        by_tag = defaultdict(list)
        for sc in group:
            by_tag[sc.record["geneval"]["tag"]].append(sc)
        for same in by_tag.values():
            for sc, other in zip(same, same[1:] + same[:1]):
                prompt = other.record["geneval"]
                truth = evaluate(truth_detections(sc.record["objects"]), prompt)[0]
                verdict = score(sc.image, prompt)[0]
                n, agree = n + 1, agree + (truth == verdict)
                if not truth:
                    false_truth, rejected = false_truth + 1, rejected + (not verdict)
    _report(capsys, "other prompts", {"verdict agreement": f"{agree}/{n}",
                                      "rejected where truth fails": f"{rejected}/{false_truth}"})
    assert false_truth >= 100
    assert rejected / false_truth >= 0.99 and agree / n >= 0.99


def test_demo_survives_tokenizer_like_blur(scenes, capsys):
    """The demo level is built for blurry tiny-model output: sigma 2 px at 64 px + noise (where the
    fill-ratio baseline, like the prototype's scorer, falls apart)."""
    group = scenes[("demo", 64)]
    imgs = [degrade(sc.image, 2.0, 8.0, np.random.default_rng(sc.record["index"])) for sc in group]
    ours = sum(agrees(img, sc.record)[0] for img, sc in zip(imgs, group))
    fill = sum(agrees(img, sc.record, method="fill")[0] for img, sc in zip(imgs, group))
    _report(capsys, "demo@64 blur 2 + noise", {"ours": f"{ours}/{len(group)}", "fill baseline": f"{fill}/{len(group)}"})
    assert ours / len(group) >= 0.95 and ours > fill
