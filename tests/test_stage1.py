"""Stage 1 end to end on shapes-world shards: artefacts, exact resume in-process and under deepspeed ZeRO-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import stage1  # launch/ and tests/assets/ are on pytest's pythonpath
import torch
from conftest import deepspeed_launch

from data.shapes_cli import DatasetConfig, write_dataset
from data.tar_index import iter_shard
from tokenizer.model import EvoTokenizer
from unimllm.checkpoint import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]

# The tiny preset shrunk further so a step takes well under a second on a shared 2-core CPU; a random-init
# teacher instead of the shapes teacher the preset names (tests/test_teacher.py trains and uses that one).
SMALL = ["--model.pixel_decoder.channels", "16", "--model.pixel_decoder.z_channels", "16",
         "--model.pixel_decoder.channel_mult", "1,1,2,2", "--model.quantizer.codebook_size", "64",
         "--model.quantizer.depth_sem", "4", "--model.quantizer.depth_pix", "2",
         "--model.encoder.hidden_size", "32", "--model.teacher.pretrained", "", "--model.teacher.hidden_size", "32",
         "--model.semantic_decoder.width", "32", "--loss.semantic_weight", "0.1",  # the teacher path too
         "--loss.semantic_refine_steps", "0", "--train.schedule.decay_steps", "0",  # runs of a few steps
         "--data.batch_size", "4", "--val.batch_size", "12",  # 12 does not divide max_images
         "--val.max_images", "16", "--val.grid_images", "4", "--train.log_every", "1", "--run.wandb_mode", "disabled"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    cfg = DatasetConfig(out=str(out), n=48, n_val=16, shard_size=16, workers=0, geneval_per_tag=2)
    write_dataset(cfg, log=lambda *_: None)
    return out


def args(shapes: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/stage1/tiny.yaml"), *SMALL,
            "--data.sources.0.shards", str(shapes / "train/shapes-train-{000000..000002}.tar"),
            "--val.shards", str(shapes / "val/shapes-val-000000.tar"),
            "--train.steps", str(steps), "--run.out_dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_stage1_in_process_artefacts_and_exact_resume(shapes, tmp_path):
    full = tmp_path / "full"
    final = stage1.main(args(shapes, full, 4, "--train.save_every", "2", "--train.eval_every", "2"))
    assert 0 < final["val/psnr"] < 60 and 0 <= final["val/ssim"] <= 1 and 0 <= final["val/shapes_accept"] <= 1
    assert final["val/images"] == 16  # --val.max_images, not a whole batch more
    assert [s for s, _ in list_checkpoints(full / "checkpoints")] == [2, 4]
    ckpt = latest_checkpoint(full / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} == {"meta.json", "tokenizer", "rank_00000.pt"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["model_config"]["quantizer"]["depth_sem"] == 4
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"train/loss/rec", "train/loss/commit", "train/loss/semantic", "train/codebook/usage_d1", "train/codebook/perplexity_d4",
            "train/codebook/restarts", "train/grad_norm_tokenizer", "train/lr_tokenizer", "perf/images_per_s",
            "perf/data_time_frac", "perf/peak_mem_gb", "val/psnr", "val/ssim", "val/shapes_accept"} <= logged
    assert list((full / "images").glob("val_reconstructions_*.png"))
    # the export loads without DeepSpeed and decodes
    model = EvoTokenizer.from_pretrained(full / "export" / "tokenizer", with_teacher=False)
    codes = model.encode(torch.zeros(1, 3, 64, 64))
    assert codes.shape == (1, 8, 8, 4) and model.decode_pixels(codes).shape == (1, 3, 64, 64)

    part = tmp_path / "part"
    stage1.main(args(shapes, part, 2))
    stage1.main(args(shapes, part, 4))  # auto-resume from step 2
    assert losses(part) == losses(full)  # bitwise


@pytest.mark.slow
def test_stage1_deepspeed_two_ranks_zero2_resume_exact(shapes, tmp_path):
    script = ROOT / "launch/stage1.py"

    def launch(out: Path, steps: int, port: int) -> None:
        deepspeed_launch(script, args(shapes, out, steps, "--train.zero_stage", "2"), port)

    launch(tmp_path / "full", 4, 29621)
    launch(tmp_path / "part", 2, 29622)
    launch(tmp_path / "part", 4, 29623)
    ckpt = latest_checkpoint(tmp_path / "part" / "checkpoints")
    assert {"meta.json", "tokenizer", "rank_00000.pt", "rank_00001.pt"} <= {p.name for p in ckpt.iterdir()}
    zero = {p.name for p in (ckpt / "tokenizer" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= zero
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert (tmp_path / "full" / "export" / "tokenizer" / "model.safetensors").is_file()


@pytest.mark.slow
def test_stage1_deepspeed_two_ranks_zero3_trains_validates_resumes_and_exports(shapes, tmp_path):
    """ZeRO-3 on 2 CPU ranks: parameters partitioned (every one: persistence threshold 0), validation and the
    reconstruction grid run on both ranks (their all-gathers are collective), exact resume, a full export."""
    script = ROOT / "launch/stage1.py"
    extra = ("--train.zero_stage", "3", "--train.zero3_persist_below", "0", "--train.eval_every", "2",
             "--train.save_every", "2")

    def launch(out: Path, steps: int, port: int) -> None:
        deepspeed_launch(script, args(shapes, out, steps, *extra), port)

    launch(tmp_path / "full", 4, 29624)
    launch(tmp_path / "part", 2, 29625)
    launch(tmp_path / "part", 4, 29626)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert [r["step"] for r in val] == [2, 4] and all(0 < r["val/psnr"] < 60 and r["val/images"] == 16 for r in val)
    assert list((tmp_path / "full" / "images").glob("val_reconstructions_*.png"))
    zero = {p.name for p in (latest_checkpoint(tmp_path / "part" / "checkpoints") / "tokenizer" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= zero
    model = EvoTokenizer.from_pretrained(tmp_path / "full" / "export" / "tokenizer", with_teacher=False)
    assert all(p.numel() > 0 for p in model.parameters())  # gathered, not a rank's empty partition
    assert model.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8, 4)


def torchrun_two_nodes(script: Path, argv: list[str], port: int, timeout: int = 600) -> None:
    """Stage 1 as two one-process "nodes" on localhost: two ``torchrun --nnodes 2 --nproc-per-node 1`` agents
    meeting through a c10d rendezvous, as two machines would (each process: LOCAL_RANK 0, RANK 0 or 1)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--max-restarts", "0",
               str(script), *argv]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)


def keys_by_step(out: Path, rank: int) -> list[list[str]]:
    lines = (out / "keys" / f"rank_{rank:05d}.txt").read_text().splitlines()
    return [line.split()[1:] for line in lines]


@pytest.mark.slow
def test_stage1_on_two_simulated_nodes_covers_an_epoch_once_and_resumes_exactly(shapes, tmp_path):
    """48 training samples, 2 ranks x 4 per step: 6 steps are one epoch. Every sample is read exactly once by one
    of the two nodes; a run stopped at step 3 and restarted continues with the same samples and losses."""
    script = ROOT / "launch/stage1.py"
    extra = ("--train.record_keys", "true", "--train.save_every", "3", "--data.num_workers", "0")
    torchrun_two_nodes(script, args(shapes, tmp_path / "full", 6, *extra), 29631)
    per_rank = [keys_by_step(tmp_path / "full", r) for r in (0, 1)]
    assert [len(k) for k in per_rank] == [6, 6] and all(len(b) == 4 for k in per_rank for b in k)
    seen = [key for k in per_rank for b in k for key in b]
    train = [s["__key__"] for p in sorted((shapes / "train").glob("*.tar")) for s in iter_shard(p)]
    assert sorted(seen) == sorted(train) and len(train) == 48  # the epoch, each sample once, split over nodes
    ckpt = latest_checkpoint(tmp_path / "full" / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} >= {"rank_00000.pt", "rank_00001.pt"}
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2

    torchrun_two_nodes(script, args(shapes, tmp_path / "part", 3, *extra), 29632)
    torchrun_two_nodes(script, args(shapes, tmp_path / "part", 6, *extra), 29633)
    assert [keys_by_step(tmp_path / "part", r) for r in (0, 1)] == per_rank  # the same samples, step by step
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
