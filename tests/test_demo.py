"""launch/demo.py: the step list (argument lists, never shell strings; every stage in its own directory) and
the final table computed from a hand-made eval output."""

from __future__ import annotations

import json
from pathlib import Path

import demo  # launch/ is on pytest's pythonpath
import yaml


def test_steps_are_argument_lists_in_chain_order(tmp_path):
    steps = demo.steps(tmp_path, threads=2, device="cpu")
    assert [name for name, _, _ in steps] == ["shapes", "teacher", "stage1", "codes", "stage2", "stage3", "eval"]
    for _, out, cmd in steps:
        assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd)
        assert str(out).startswith(str(tmp_path))
    by = {name: cmd for name, _, cmd in steps}
    for name in ("teacher", "stage1", "stage2", "stage3"):
        assert by[name][by[name].index("--train.threads") + 1] == "2"
    # stage 1 regresses the teacher the chain trains first
    assert by["stage1"][by["stage1"].index("--model.teacher.pretrained") + 1] == str(tmp_path / "teacher" / "export" / "teacher")
    assert by["teacher"][by["teacher"].index("--run.out_dir") + 1] == str(tmp_path / "teacher")
    assert by["stage3"][by["stage3"].index("--init_from") + 1] == str(tmp_path / "stage2" / "export" / "unified")
    assert by["eval"][by["eval"].index("--ckpt") + 1] == str(tmp_path / "stage3" / "export" / "unified")


def test_teacher_off_control_drops_the_teacher_and_the_semantic_loss(tmp_path):
    steps = demo.steps(tmp_path, threads=2, device="cpu", teacher_on=False)
    assert [name for name, _, _ in steps] == ["shapes", "stage1", "codes", "stage2", "stage3", "eval"]
    s1 = dict((n, c) for n, _, c in steps)["stage1"]
    assert s1[s1.index("--loss.semantic_weight") + 1] == "0"
    assert s1[s1.index("--model.teacher.pretrained") + 1] == ""  # no teacher directory is read
    # no semantic refinement either: the joint steps only, so the pixel path trains exactly as with the teacher
    cfg = yaml.safe_load((demo.ROOT / "launch/configs/stage1/tiny.yaml").read_text())
    assert s1[s1.index("--loss.semantic_refine_steps") + 1] == "0"
    assert int(s1[s1.index("--train.steps") + 1]) == cfg["train"]["steps"] - cfg["loss"]["semantic_refine_steps"]


def test_presets_pick_their_configs_and_scene_counts(tmp_path):
    for preset, n in (("tiny", "4000"), ("small", "40000")):
        by = {name: cmd for name, _, cmd in demo.steps(tmp_path, threads=4, device="cuda", preset=preset)}
        assert by["shapes"][by["shapes"].index("--n") + 1] == n
        assert by["shapes"][by["shapes"].index("--shard_size") + 1] == str(int(n) // 4)  # always 4 shards
        for name in ("stage1", "stage2", "stage3"):
            assert by[name][by[name].index("--config") + 1] == f"launch/configs/{name}/{preset}.yaml"
            assert (demo.ROOT / f"launch/configs/{name}/{preset}.yaml").is_file()
            assert by[name][by[name].index("--train.device") + 1] == "cuda"
        assert by["codes"][by["codes"].index("--device") + 1] == "cuda"
        assert ("--world.qa_pairs" in by["shapes"]) == (preset == "small")


def test_table_from_eval_outputs(tmp_path: Path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "train/loss": 1.0}) + "\n" + json.dumps({"step": 10, "val/shapes_accept": 0.9}) + "\n")
    ev = tmp_path / "stage3" / "eval"
    ev.mkdir(parents=True)
    mme = {"existence/acc": 80.0, "existence/acc_plus": 60.0, "count/acc": 90.0, "count/acc_plus": 70.0,
           "perception": 300.0}
    gen = {"overall": 0.4, "tags": {"colors": 0.5, "position": 0.3},
           "control": {"overall": 0.1, "tags": {"colors": 0.1, "position": 0.1}}}
    (ev / "scores.json").write_text(json.dumps({"recon": {"psnr": 30.5}, "shapes_mme": mme, "shapes_geneval": gen}))
    md, nums = demo.table(tmp_path, {"stage2": 120.0, "total": 600.0})
    assert nums["mme_acc"] == 85.0 and nums["mme_acc_plus"] == 65.0  # means over the subtasks
    assert nums["stage1_scorer_accept"] == 0.9 and nums["geneval"] == 0.4 and nums["geneval_control"] == 0.1
    assert "| shapes-MME acc / acc+ (mean of 2 subtasks) | 85.0 / 65.0 |" in md
    assert "| &nbsp; colors | 0.50 (0.10) |" in md and "| wall: stage2 | 2.0 min (120 s) |" in md
