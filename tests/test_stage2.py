"""Stage 2 end to end on shapes-world shards with precomputed codes: artefacts, exact resume in-process, and
deepspeed ZeRO-2 on two ranks followed by a fresh process that loads the export and samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stage2  # launch/ is on pytest's pythonpath
from conftest import deepspeed_launch, save_tiny_tokenizer

from unimllm.checkpoint import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.llm.hidden_size", "32", "--model.llm.num_layers", "2", "--model.llm.intermediate_size", "64",
         "--model.depth.width", "32", "--model.depth.layers", "1", "--text_tokenizer.vocab_size", "300",
         "--data.batch_size", "4", "--mix.group_batches", "2", "--val.max_questions", "12", "--val.max_prompts", "12",
         "--val.batch_size", "8", "--val.grid_images", "4", "--train.log_every", "1", "--train.threads", "1",
         "--run.wandb_mode", "disabled"]


@pytest.fixture(scope="module")
def world(stage2_world) -> Path:
    """Shapes shards, a small random tokenizer and codes precomputed with it (conftest.stage2_world)."""
    return stage2_world


def args(world: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/stage2/tiny.yaml"), *SMALL,
            "--model.tokenizer", str(world / "tok"),
            "--data.sources.0.shards", str(world / "codes/shapes-train-{000000..000002}.tar"),
            "--val.shards", str(world / "shapes/val/shapes-val-000000.tar"),
            "--val.geneval_prompts", str(world / "shapes/val/geneval_prompts.jsonl"),
            "--train.steps", str(steps), "--run.out_dir", str(out), *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in rows(out) if "train/loss" in r]


def test_stage2_in_process_artefacts_and_exact_resume(world, tmp_path):
    full = tmp_path / "full"
    final = stage2.main(args(world, full, 4, "--train.save_every", "2"))
    assert 0 <= final["val/yes_no_acc"] <= 1 and final["val/questions"] == 12
    assert 0 <= final["val/geneval_matched"] <= 1 and 0 <= final["val/geneval_shuffled"] <= 1
    assert [s for s, _ in list_checkpoints(full / "checkpoints")] == [2, 4]
    logged = {k for r in rows(full) for k in r}
    assert {"train/text_loss", "train/image_loss", "train/loss", "train/gen_fraction", "train/pad_fraction",
            "train/grad_norm_unified", "train/lr_unified", "perf/samples_per_s", "perf/tokens_per_s",
            "perf/peak_mem_gb", "val/geneval_matched/single_object"} <= logged
    assert (full / "images").is_dir() and any((full / "images").iterdir())
    export = full / "export" / "unified"
    assert {"unified_config.json", "heads.safetensors", "llm", "text_tokenizer"} <= {p.name for p in export.iterdir()}
    meta = json.loads((export / "unified_config.json").read_text())
    assert meta["tokenizer"]["path"] == str((world / "tok").resolve()) and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["model"]["sampler"]["cfg_scale"] == 3.0

    part = tmp_path / "part"
    stage2.main(args(world, part, 2))
    stage2.main(args(world, part, 4))  # resumes from step 2: loader group position, RNG, optimizer
    assert losses(part) == losses(full)


def test_stage2_refuses_codes_from_another_tokenizer(world, tmp_path):
    save_tiny_tokenizer(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="precomputed codes do not fit model.tokenizer"):
        stage2.main(args(world, tmp_path / "run", 1, "--model.tokenizer", str(tmp_path / "other")))
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        stage2.main(args(world, tmp_path / "run", 1, "--model.tokenizer", str(tmp_path / "missing")))


def test_turn_blocks_refuse_flash_attention(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        stage2.main(args(world, tmp_path / "run", 1, "--model.llm.attn_implementation", "flash_attention_2"))
    assert "mix.independent_turns" in capsys.readouterr().err


def test_stage2_deepspeed_zero2_export_reloads_in_a_fresh_process(world, tmp_path):
    out = tmp_path / "ds"
    deepspeed_launch(ROOT / "launch/stage2.py", args(world, out, 3, "--train.zero_stage", "2"), 29632)
    ckpt = latest_checkpoint(out / "checkpoints")
    assert {"meta.json", "unified", "rank_00000.pt", "rank_00001.pt"} <= {p.name for p in ckpt.iterdir()}
    zero = {p.name for p in (ckpt / "unified" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= zero
    assert len(losses(out)) == 3
    code = (
        "import json, sys\n"
        "from unimllm.stages.pipeline import UnifiedPipeline\n"
        "pipe = UnifiedPipeline.from_pretrained(sys.argv[1])\n"
        "imgs = pipe.generate_image(['a photo of a red circle'], seed=0)\n"
        "again = pipe.generate_image(['a photo of a red circle'], seed=0)\n"
        "ans = pipe.answer(imgs, ['Is there a red circle in the image? Please answer yes or no.'], max_new_tokens=4)\n"
        "print(json.dumps({'shape': list(imgs[0].shape), 'same': bool((imgs[0] == again[0]).all()), 'answer': ans}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out / "export" / "unified")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shape"] == [64, 64, 3] and got["same"] and isinstance(got["answer"][0], str)


@pytest.mark.slow
def test_stage2_deepspeed_zero3_trains_validates_resumes_and_exports(world, tmp_path):
    """ZeRO-3 on 2 CPU ranks, every parameter partitioned: in-loop validation and the sample grid (both ranks
    run them: their all-gathers are collective), a save that finishes, exact resume, a full export."""
    extra = ("--train.zero_stage", "3", "--train.zero3_persist_below", "0", "--train.eval_every", "2",
             "--train.save_every", "2")
    deepspeed_launch(ROOT / "launch/stage2.py", args(world, tmp_path / "full", 4, *extra), 29633)
    deepspeed_launch(ROOT / "launch/stage2.py", args(world, tmp_path / "part", 2, *extra), 29634)
    deepspeed_launch(ROOT / "launch/stage2.py", args(world, tmp_path / "part", 4, *extra), 29635)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    val = [r for r in rows(tmp_path / "full") if "val/yes_no_acc" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/questions"] == 12 for r in val)
    assert (tmp_path / "full" / "images").is_dir() and any((tmp_path / "full" / "images").iterdir())
    ckpt = latest_checkpoint(tmp_path / "part" / "checkpoints")
    zero = {p.name for p in (ckpt / "unified" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= zero
    from safetensors.numpy import load_file

    export = tmp_path / "full" / "export" / "unified"
    heads = load_file(export / "heads.safetensors")
    assert heads and all(v.size > 0 for v in heads.values())  # gathered, not a rank's empty partition


def test_sequence_sample_turn_order_and_caption_prompts():
    """shuffle_turns: every (question, answer) pair kept, in a random order, <image> in front of the first
    question only; caption_prob: generation samples read the caption instead of the prompt at that rate."""
    import numpy as np

    from data.config import ImageConfig
    from unimllm.stages.alignment_config import MixConfig
    from unimllm.stages.samples import SequenceSample

    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."},
            {"from": "human", "value": "Is the circle red?"}, {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "How many circles?"}, {"from": "gpt", "value": "One."}]
    pairs = {("Describe the image.", "A red circle."), ("Is the circle red?", "Yes"), ("How many circles?", "One.")}
    firsts = set()
    for seed in range(12):
        out = SequenceSample.shuffled_turns(conv, np.random.default_rng(seed))
        assert [t["from"] for t in out] == ["human", "gpt"] * 3
        assert out[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in out[1:])
        got = {(out[i]["value"].replace("<image>\n", ""), out[i + 1]["value"]) for i in (0, 2, 4)}
        assert got == pairs
        firsts.add(out[1]["value"])
    assert len(firsts) == 3  # each pair comes first for some seed

    meta = {"prompt": "a photo of a red circle", "caption": "One object: a red circle in the center.",
            "conversations": conv}
    mapper = SequenceSample(None, MixConfig(generation_ratio=1.0, caption_prob=0.5, uncond_prob=0.0), ImageConfig(), True)
    rng = np.random.default_rng(0)
    prompts = [mapper.conversation(meta, rng)[0]["value"] for _ in range(400)]
    assert set(prompts) == {meta["prompt"], meta["caption"]}
    assert 0.4 < prompts.count(meta["caption"]) / 400 < 0.6


def test_length_chunks_keep_the_task_mix():
    """Plain grouping makes one-task micro-batches; stratified grouping keeps each micro-batch's mix of tasks
    and sorts lengths within each task."""
    from data.grouping import length_chunks

    rng = np.random.default_rng(0)
    task = [bool(t) for t in rng.random(64) < 0.6]
    lengths = [int(rng.integers(60, 90)) if t else int(rng.integers(150, 320)) for t in task]
    plain = length_chunks(lengths, 8)
    assert sum(len({task[i] for i in c}) == 1 for c in plain) >= 6  # almost all one task
    mixed = length_chunks(lengths, 8, task)
    assert sorted(i for c in mixed for i in c) == list(range(64)) and len(mixed) == 8
    n_gen = sum(task)
    for c in mixed:
        gen = [i for i in c if task[i]]
        assert abs(len(gen) - n_gen / 8) <= 1 and abs(len(c) - 8) <= 2
    und_runs = [sorted(lengths[i] for i in c if not task[i]) for c in mixed]
    assert all(a[-1] >= b[0] for a, b in zip(und_runs, und_runs[1:]))  # contiguous runs, longest first
