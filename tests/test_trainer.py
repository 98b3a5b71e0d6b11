"""The shared trainer: artefacts, exact resume (in-process and under deepspeed with ZeRO-2), atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_stage  # launch/ and tests/assets/ are on pytest's pythonpath
from conftest import deepspeed_launch
from PIL import Image

from data.schema import make_sample
from data.shard_writer import ShardWriter
from unimllm.checkpoint import latest_checkpoint, list_checkpoints
from unimllm.trainer import ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy_shards")
    rng = np.random.default_rng(0)
    with ShardWriter(str(root / "toy-%06d.tar"), max_samples=20) as w:
        for i in range(60):
            img = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
            w.write(make_sample(f"t{i:04d}", img, {"task": "reconstruct"}))
    return str(root / "toy-{000000..000002}.tar")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def args(out: Path, shards: str, steps: int, *extra: str) -> list[str]:
    return ["--run.out_dir", str(out), "--run.wandb_mode", "disabled", "--data.sources.0.shards", shards,
            "--train.steps", str(steps), "--train.log_every", "1", "--train.device", "cpu", *extra]


def test_in_process_run_writes_artefacts_and_resumes_exactly(tmp_path, shards):
    full = tmp_path / "full"
    toy_stage.main(args(full, shards, 8, "--train.grad_accum", "2", "--train.save_every", "2", "--train.keep_last", "2"))
    steps = [s for s, _ in list_checkpoints(full / "checkpoints")]
    assert steps == [6, 8]  # retention: the last two
    ckpt = latest_checkpoint(full / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} == {"meta.json", "model", "rank_00000.pt"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 1 and meta["config"]["train"]["steps"] == 8
    assert (full / "config.yaml").is_file()
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert all(r["perf/images_per_s"] > 0 and 0 <= r["perf/data_time_frac"] <= 1 for r in rows)

    part = tmp_path / "part"
    toy_stage.main(args(part, shards, 5, "--train.grad_accum", "2"))
    toy_stage.main(args(part, shards, 8, "--train.grad_accum", "2"))  # resume: auto
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bitwise equal floats


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, shards, monkeypatch):
    out = tmp_path / "crash"
    toy_stage.main(args(out, shards, 2))
    good = latest_checkpoint(out / "checkpoints")
    import unimllm.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        toy_stage.main(args(out, shards, 4))
    monkeypatch.undo()
    assert not torch.distributed.is_initialized()  # fit left the process group on the way out
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert rows and all(json.loads(r)["step"] <= 4 for r in rows)  # the logger was closed: flushed, parseable
    assert latest_checkpoint(out / "checkpoints") == good  # the half-written step_4 is .tmp, ignored
    assert (out / "checkpoints" / "step_00000004.tmp").is_dir()
    toy_stage.main(args(out, shards, 4))  # resumes from step 2 and finishes; the stale .tmp is replaced
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert not (out / "checkpoints" / "step_00000004.tmp").exists()


def test_schedule_shapes():
    s = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    f = [s.factor(i, 10) for i in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and abs(f[-1] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert ScheduleConfig(kind="linear").factor(9, 10) == 0.0


@pytest.mark.slow
def test_deepspeed_two_ranks_zero2_resume_exact(tmp_path, shards):
    """`deepspeed --num_accelerators 2` with ZeRO-2: 6 steps == 3 steps + resume + 3 steps, bitwise."""
    script = ROOT / "tests/assets/toy_stage.py"

    def launch(out: Path, steps: int, port: int) -> None:
        deepspeed_launch(script, args(out, shards, steps, "--train.zero_stage", "2"), port, timeout=300)

    launch(tmp_path / "full", 6, 29611)
    launch(tmp_path / "part", 3, 29612)
    launch(tmp_path / "part", 6, 29613)
    ckpt = latest_checkpoint(tmp_path / "part" / "checkpoints")
    names = {p.name for p in ckpt.iterdir()}
    assert {"meta.json", "model", "rank_00000.pt", "rank_00001.pt"} <= names
    zero = {p.name for p in (ckpt / "model" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= zero
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_wandb_offline_run_is_written(tmp_path, shards, monkeypatch):
    """A real W&B run in offline mode (no network): the run directory and its history file exist."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    a = args(out, shards, 2)
    a[a.index("--run.wandb_mode") + 1] = "offline"
    toy_stage.main(a)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_engine_clips_only_as_configured_and_logs_the_pre_clip_norm(clip):
    """DeepSpeed's own default is gradient_clipping 1.0: grad_clip 0 must mean no clipping, and the logged
    norm must be the norm before clipping (a regression: it used to read 1.0 after DeepSpeed clipped)."""
    import torch

    from unimllm.distributed import build_engine, deepspeed_config, grad_norm, init_distributed

    init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = build_engine(model, opt, deepspeed_config(micro_batch=8, grad_accum=1, zero_stage=0, precision="fp32",
                                                       grad_clip=clip))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(torch.randn(8, 4) * 100).pow(2).mean())
    grads = [p.grad.detach().clone() for p in model.parameters()]
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert norm > 10
    engine.step()
    scale = min(1.0, clip / norm) if clip else 1.0
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - scale * g)
    if clip:
        assert grad_norm(engine) == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_engine_computes_in_bf16(device):
    """bf16-autocast: the engine's forward computes in bf16 under the task's autocast (DeepSpeed turns an outer
    CUDA autocast off unless its torch_autocast section is set: a GPU run silently trained in fp32), while the
    weights and their gradients stay fp32."""
    import torch

    from unimllm.distributed import build_engine, deepspeed_config, init_distributed

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    init_distributed(device)
    model = torch.nn.Linear(8, 8).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = build_engine(model, opt, deepspeed_config(micro_batch=4, grad_accum=1, zero_stage=0,
                                                       precision="bf16-autocast", grad_clip=1.0))
    with torch.autocast(device, dtype=torch.bfloat16):
        y = engine(torch.randn(4, 8, device=device))
    assert y.dtype == torch.bfloat16
    engine.backward(y.float().pow(2).mean())
    assert model.weight.dtype == torch.float32 and model.weight.grad.dtype == torch.float32
    engine.step()
