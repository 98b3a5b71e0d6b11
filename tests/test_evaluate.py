"""launch/evaluate.py in-process on a tiny real unified export and shapes-world data: the artefacts of the shapes
suite (settings, scores, report, layout, predictions), GenEval resume, checkpoint-kind errors, and the recon,
MME, POPE and GenEval (stub scorer) suites."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import evaluate  # launch/ is on pytest's pythonpath
import numpy as np
import pytest
from conftest import ROOT, deepspeed_launch, save_tiny_tokenizer, save_tiny_unified
from PIL import Image

from data.shapes_cli import DatasetConfig, write_dataset
from eval.geneval import SEED_RULE, read_prompts, sample_seed
from eval.geneval_shapes import TAGS
from unimllm.errors import ArtifactError
from unimllm.stages.evaluation import generate_images
from unimllm.stages.pipeline import UnifiedPipeline

QUICK = ["--log.wandb_mode", "disabled", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Shapes val shards + prompts + MME folder, a tiny EvoTok export and a tiny unified export referencing it."""
    out = tmp_path_factory.mktemp("eval_world")
    write_dataset(DatasetConfig(out=str(out / "shapes"), n=0, n_val=12, shard_size=12, workers=1, geneval_per_tag=2),
                  log=lambda *_: None)
    tok = save_tiny_tokenizer(out / "run1" / "export" / "tokenizer")
    save_tiny_unified(out / "run2" / "export" / "unified", tok, out / "run1" / "export" / "tokenizer")
    return out


def shapes_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/eval/shapes.yaml"), "--ckpt", str(world / "run2/export/unified"),
            "--out", str(out), "--shapes.shards", str(world / "shapes/val/shapes-val-000000.tar"),
            "--shapes.geneval_prompts", str(world / "shapes/val/geneval_prompts.jsonl"), "--recon.max_images", "8",
            "--mme.max_images", "3", "--mme.batch_size", "16", "--geneval.max_per_tag", "0",
            "--geneval.batch_size", "12", *QUICK, *extra]


def test_shapes_suite_artefacts_and_resume(world, tmp_path):
    out = tmp_path / "eval"
    scores = evaluate.main(shapes_args(world, out))
    files = {p.name for p in out.iterdir()}
    assert {"settings.json", "scores.json", "report.md", "metrics.jsonl", "recon_grid.png", "geneval_grid.png",
            "geneval_results.jsonl", "geneval_results_shuffled.jsonl", "mme", "geneval"} <= files

    settings = json.loads((out / "settings.json").read_text())
    assert settings["suite"] == "shapes" and settings["config"]["geneval"]["n_samples"] == 1
    assert settings["sampler"] == {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert settings["seeds"]["seed"] == 0 and settings["seeds"]["geneval_seed_rule"] == SEED_RULE
    data = settings["data"]
    shard, prompts = world / "shapes/val/shapes-val-000000.tar", world / "shapes/val/geneval_prompts.jsonl"
    assert {str(shard.resolve()), str(prompts.resolve())} <= set(data) and all(len(h) == 64 for h in data.values())
    ck = settings["checkpoint"]
    assert ck["kind"] == "unified" and len(ck["sha256"]) == 64 and "heads.safetensors" in ck["files"]
    assert ck["tokenizer"]["sha256"] == json.loads((world / "run2/export/unified/unified_config.json").read_text())[
        "tokenizer"]["sha256"]
    ev = settings["evaluators"]
    assert ev["unimllm"] and ev["torch"] and ev["transformers"] and "commit" in ev["git"]
    assert ev["scorer"]["name"] == "eval.shapes_scorer" and len(ev["scorer"]["module_sha256"]) == 64

    on_disk = json.loads((out / "scores.json").read_text())
    assert set(on_disk) == {"recon", "shapes_mme", "shapes_geneval"} == set(scores)
    mme = on_disk["shapes_mme"]
    subtasks = [k[:-4] for k in mme if k.endswith("/acc")]
    assert subtasks and mme["images"] == 3 * len(subtasks)
    for s in subtasks:
        assert 0 <= mme[f"{s}/acc"] <= 100 and 0 <= mme[f"{s}/acc_plus"] <= mme[f"{s}/acc"]
    assert 0 <= mme["total"] <= 200 * len(subtasks)
    gen = on_disk["shapes_geneval"]
    assert list(gen["tags"]) == list(TAGS) and list(gen["control"]["tags"]) == list(TAGS)
    assert all(0 <= v <= 1 for v in [*gen["tags"].values(), *gen["control"]["tags"].values()])
    assert gen["overall"] == pytest.approx(np.mean(list(gen["tags"].values())))
    assert 0 <= gen["control"]["overall"] <= 1 and gen["n_prompts"] == 12 and gen["n_images"] == 12
    assert gen["generation"] == {"prompts": 12, "skipped": 0, "generated": 12, "images": 12}
    rec = on_disk["recon"]
    assert rec["n_images"] == 8 and rec["psnr"] > 0 and 0 <= rec["usage_d1"] <= 1 and -1 <= rec["ssim"] <= 1

    report = (out / "report.md").read_text()
    for row in ("## Reconstruction", "## Shapes-MME", "## Shapes-GenEval", "| psnr |", "| **total** |",
                "| **overall** |", "shuffled-prompt control", "ratio", *(f"| {t} |" for t in TAGS),
                *(f"| {s} |" for s in subtasks)):
        assert row in report, row

    layout = out / "geneval"
    manifest = json.loads((layout / "manifest.json").read_text())
    assert manifest["n_prompts"] == 12 and manifest["n_samples"] == 1 and manifest["seed_rule"] == SEED_RULE
    assert manifest["prompts_file"] == str(prompts)
    assert manifest["sampler"]["checkpoint_sha256"] == ck["sha256"] and manifest["sampler"]["cfg_scale"] == 3.0
    folders = sorted(p for p in layout.iterdir() if p.is_dir())
    assert [p.name for p in folders] == [f"{i:05d}" for i in range(12)]
    assert all((f / "metadata.jsonl").is_file() and (f / "samples" / "0000.png").is_file() for f in folders)
    with Image.open(folders[0] / "samples" / "0000.png") as img:
        assert img.size == (64, 64)
    assert {f"{s}.txt" for s in subtasks} | {"replies.jsonl"} == {p.name for p in (out / "mme").iterdir()}
    assert len((out / "mme" / "replies.jsonl").read_text().splitlines()) == mme["questions"]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["eval/shapes_geneval/overall"] == gen["overall"] and "eval/shapes_mme/total" in logged
    assert {p.name for p in (out / "images").iterdir()} == {"eval_recon_grid_0000000.png",
                                                            "eval_geneval_samples_0000000.png"}

    # the sampled images honour the layout's per-image seed rule
    pipe = UnifiedPipeline.from_pretrained(world / "run2/export/unified")
    spec = read_prompts(world / "shapes/val/geneval_prompts.jsonl")[2]  # prompt index 2: the file's third line
    assert json.loads((folders[2] / "metadata.jsonl").read_text()) == spec
    again = generate_images(pipe, [spec["prompt"]], [sample_seed(0, 2, 0)], pipe.sampler)[0].astype(int)
    diff = np.abs(np.asarray(Image.open(folders[2] / "samples" / "0000.png")).astype(int) - again)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # same codes; decoding 12 vs 1 image rounds a few pixels

    # a rerun resumes: every prompt folder is complete, nothing is generated again
    stamp = (folders[5] / "samples" / "0000.png").stat().st_mtime_ns
    again_scores = evaluate.main(shapes_args(world, out))
    assert again_scores["shapes_geneval"]["generation"] == {"prompts": 12, "skipped": 12, "generated": 0, "images": 0}
    assert (folders[5] / "samples" / "0000.png").stat().st_mtime_ns == stamp
    assert again_scores["shapes_geneval"]["tags"] == gen["tags"]
    # other sampler settings must not resume into the same layout
    with pytest.raises(ValueError, match="other settings"):
        evaluate.main(shapes_args(world, out, "--geneval.cfg_scale", "1.5"))


def test_wrong_checkpoint_kind_is_refused(world, tmp_path):
    base = shapes_args(world, tmp_path / "x")
    with pytest.raises(ArtifactError, match=r"is a stage-1 tokenizer export .*; ckpt \(suite shapes\) needs a unified"):
        evaluate.main([*base, "--ckpt", str(world / "run1/export/tokenizer")])
    with pytest.raises(ArtifactError, match=r"ckpt \(suite shapes\): .*missing does not exist"):
        evaluate.main([*base, "--ckpt", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="empty: is not a stage-1 tokenizer export .*, a unified export"):
        evaluate.main([*base, "--ckpt", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="tokenizer: .* is not an EvoTok export"):
        evaluate.main([*base, "--tokenizer", str(tmp_path / "empty")])


def test_config_errors_name_the_field(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--suite", "mme", "--ckpt", str(world / "run2"), *QUICK])
    assert e.value.code == 2 and "mme.path: suite mme needs it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--suite", "geneval", "--ckpt", str(world / "run2"), "--geneval.scorer_python", "python"])
    assert "geneval.scorer_python" in capsys.readouterr().err


def test_recon_suite_on_a_tokenizer_run_folder(world):
    scores = evaluate.main(["--suite", "recon", "--ckpt", str(world / "run1"), "--recon.source",
                            str(world / "shapes/val/shapes-val-000000.tar"), "--recon.max_images", "4", *QUICK])
    out = world / "run1" / "eval" / "recon"  # default: <run>/eval/<suite>
    assert json.loads((out / "scores.json").read_text()) == json.loads(json.dumps(scores))
    assert scores["recon"]["n_images"] == 4 and "| psnr |" in (out / "report.md").read_text()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["checkpoint"]["kind"] == "tokenizer" and settings["sampler"] is None


def test_mme_and_pope_suites(world, tmp_path):
    mme_dir = world / "shapes/val/mme"  # the eval_tool layout written by data.shapes
    scores = evaluate.main(["--suite", "mme", "--ckpt", str(world / "run2"), "--mme.path", str(mme_dir),
                            "--mme.max_images", "2", "--mme.max_new_tokens", "3", "--out", str(tmp_path / "mme"),
                            *QUICK])["mme"]
    assert scores["images"] == 2 * sum(k.endswith("/acc") for k in scores)
    settings = json.loads((tmp_path / "mme" / "settings.json").read_text())
    assert any(p.endswith(".png") for p in settings["data"]) and any(p.endswith(".txt") for p in settings["data"])
    assert settings["answering"]["decoding"] == "greedy" and (tmp_path / "mme" / "mme" / "replies.jsonl").is_file()

    pope = tmp_path / "pope"
    pope.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(pope / f"img{i}.png")
    lines = [{"question_id": k, "image": f"img{k % 2}.png", "text": f"Is there a {c} circle in the image?",
              "label": "yes" if k % 2 else "no"} for k, c in enumerate(("red", "blue", "green", "red"))]
    (pope / "coco_pope_random.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    scores = evaluate.main(["--suite", "pope", "--ckpt", str(world / "run2"), "--pope.path", str(pope),
                            "--pope.splits", "random", "--out", str(tmp_path / "pope_out"), *QUICK])["pope"]
    assert scores["questions"] == 4 and 0 <= scores["random/f1"] <= 1
    answers = (tmp_path / "pope_out" / "pope" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 4 and "| random |" in (tmp_path / "pope_out" / "report.md").read_text()


STUB_SCORER = """
import json, os, sys
image_dir, outfile = sys.argv[1], sys.argv[sys.argv.index("--outfile") + 1]
with open(outfile, "w") as f:
    for sub in sorted(os.listdir(image_dir)):
        if sub.isdigit():
            meta = json.load(open(os.path.join(image_dir, sub, "metadata.jsonl")))
            for name in sorted(os.listdir(os.path.join(image_dir, sub, "samples"))):
                f.write(json.dumps({"filename": name, "tag": meta["tag"], "prompt": meta["prompt"],
                                    "correct": meta["tag"] != "position", "reason": "", "metadata": json.dumps(meta),
                                    "details": "{}"}) + "\\n")
"""


def test_geneval_suite_generates_then_scores_or_says_how(world, tmp_path):
    prompts = world / "shapes/val/geneval_prompts.jsonl"  # GenEval format
    common = ["--suite", "geneval", "--ckpt", str(world / "run2"), "--geneval.prompts", str(prompts),
              "--geneval.max_per_tag", "1", "--geneval.n_samples", "2", "--geneval.batch_size", "12", *QUICK]
    out = tmp_path / "g"
    scores = evaluate.main([*common, "--out", str(out)])["geneval"]
    assert scores["scored"] is False and "evaluate_images.py" in scores["how_to_score"]
    assert scores["generation"]["images"] == 12 and "Not scored" in (out / "report.md").read_text()

    geneval_dir, det = tmp_path / "geneval", tmp_path / "det"
    (geneval_dir / "evaluation").mkdir(parents=True)
    (geneval_dir / "evaluation" / "evaluate_images.py").write_text(STUB_SCORER)
    det.mkdir()
    (det / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth").write_bytes(b"stub")
    scores = evaluate.main([*common, "--out", str(out), "--geneval.scorer_python", sys.executable,
                            "--geneval.geneval_dir", str(geneval_dir), "--geneval.detector_path", str(det)])["geneval"]
    assert scores["generation"]["generated"] == 0  # resumed
    assert scores["tags"]["position"] == 0 and scores["tags"]["colors"] == 1
    assert scores["overall"] == pytest.approx(5 / 6) and scores["n_images"] == 12
    settings = json.loads((out / "settings.json").read_text())
    assert settings["evaluators"]["scorer"]["name"].startswith("djghosh13/geneval")
    assert "| **overall** |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_scores(world, tmp_path):
    """Questions, prompts and recon images split over 2 ranks (deepspeed launcher, gloo): same scores."""
    one = evaluate.main(shapes_args(world, tmp_path / "one"))
    deepspeed_launch(ROOT / "launch/evaluate.py", shapes_args(world, tmp_path / "two"), 29651)
    two = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert two == json.loads(json.dumps(one))
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["world_size"] == 2
