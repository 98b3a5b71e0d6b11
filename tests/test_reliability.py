"""What a careful user breaks: a tampered checkpoint, a diverging run, a bad path, a re-exported tokenizer, a
resumed W&B run. Each must end cleanly: nothing unpickled, nothing non-finite saved, one line and exit 2/3."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_stage  # launch/ and tests/assets/ are on pytest's pythonpath
from PIL import Image

from data.schema import make_sample
from data.shard_writer import ShardWriter
from unimllm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from unimllm.config import ConfigError
from unimllm.stages.artifacts import tokenizer_fingerprint
from unimllm.trainer import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("toy_shards")
    rng = np.random.default_rng(0)
    with ShardWriter(str(root / "toy-%06d.tar"), max_samples=20) as w:
        for i in range(60):
            img = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
            w.write(make_sample(f"t{i:04d}", img, {"task": "reconstruct"}))
    return str(root / "toy-{000000..000002}.tar")


def args(out: Path, shards: str, steps: int, *extra: str) -> list[str]:
    return ["--run.out_dir", str(out), "--run.wandb_mode", "disabled", "--data.sources.0.shards", shards,
            "--train.steps", str(steps), "--train.log_every", "1", "--train.device", "cpu", *extra]


def run_toy(argv: list[str]) -> subprocess.CompletedProcess:
    """tests/assets/toy_stage.py as a user runs a launcher (its own process, the launchers' error handling)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ASSETS)])
    return subprocess.run([sys.executable, str(ASSETS / "toy_stage.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


class _Hostile:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    toy_stage.main(args(run, shards, 2))
    states = latest_checkpoint(run / "checkpoints") / "model" / "state" / "mp_rank_00_model_states.pt"
    good = torch.load(states, weights_only=True)  # the real DeepSpeed file: tensors and plain values only
    marker = tmp_path / "pwned"
    with open(states, "wb") as f:
        pickle.dump({"module": good["module"], "payload": _Hostile(marker)}, f)

    with pytest.raises(CheckpointError, match="refused") as e:  # train.resume: auto picks it up
        toy_stage.main(args(run, shards, 4))
    assert str(states.parent.parent) in str(e.value)
    res = run_toy(args(run, shards, 4))  # the launcher: one line, exit 2
    assert res.returncode == 2, res.stderr[-2000:]
    assert "refused" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()  # the payload never ran


def test_a_real_checkpoint_resumes_through_the_weights_only_loader(tmp_path, shards):
    full, part = tmp_path / "full", tmp_path / "part"
    toy_stage.main(args(full, shards, 4))
    toy_stage.main(args(part, shards, 2))
    toy_stage.main(args(part, shards, 4))  # DeepSpeed's loader under weights_only_loads()
    assert loss_rows(full) == loss_rows(part)


def loss_rows(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def all_finite(ckpt: Path) -> bool:
    sd = torch.load(ckpt / "model" / "state" / "mp_rank_00_model_states.pt", weights_only=True)
    return all(torch.isfinite(t).all() for t in sd["module"].values())


def test_divergence_stops_before_a_non_finite_checkpoint_or_export(tmp_path, shards):
    run = tmp_path / "run"
    toy_stage.main(args(run, shards, 2, "--train.save_every", "1"))  # a healthy start: checkpoints 1 and 2
    with pytest.raises(TrainingDiverged, match="non-finite") as e:  # then the learning rate explodes
        toy_stage.main(args(run, shards, 60, "--lr", "1e30", "--train.save_every", "1", "--train.keep_last", "2"))
    assert "stopping before anything is saved" in str(e.value)
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and all(all_finite(p) for _, p in ckpts)  # retention never dropped the last finite ones for NaN
    assert not (run / "export").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) < 60  # it stopped, it did not train on

    res = run_toy(args(tmp_path / "cli", shards, 60, "--lr", "1e30"))
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "cli" / "checkpoints").exists() or all(
        all_finite(p) for _, p in list_checkpoints(tmp_path / "cli" / "checkpoints"))


def test_a_missing_resume_path_is_one_line_and_writes_nothing(tmp_path, shards):
    run = tmp_path / "run"
    missing = tmp_path / "nowhere" / "step_00000002"
    with pytest.raises(ConfigError, match="train.resume"):
        toy_stage.main(args(run, shards, 2, "--train.resume", str(missing)))
    res = run_toy(args(run, shards, 2, "--train.resume", str(missing)))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.resume" in res.stderr and str(missing) in res.stderr
    assert not run.exists()  # no config, no metrics, no W&B run


def run_launcher(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("field, value", [("model.tokenizer", "{tmp}/no_tokenizer"),
                                          ("data.sources.0.shards", "{tmp}/codes/none-{{000000..000002}}.tar"),
                                          ("val.shards", "{tmp}/val/none.tar")])
def test_bad_stage2_paths_are_one_line_exit_2_and_write_nothing(stage2_world, tmp_path, field, value):
    from test_stage2 import args as stage2_args

    value = value.format(tmp=tmp_path)
    run = tmp_path / "run"
    res = run_launcher("stage2.py", stage2_args(stage2_world, run, 1, f"--{field}", value))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and field in line[0] and value.split("{")[0].rstrip("-") in line[0], res.stderr[-2000:]
    assert not run.exists() or not any(run.iterdir())  # no config, no metrics, no W&B run, no text tokenizer


def test_a_resumed_run_repeats_no_metrics_step_and_continues_its_wandb_run(tmp_path, shards, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    full, part = tmp_path / "full", tmp_path / "part"
    toy_stage.main(args(full, shards, 6))
    wb = ["--run.wandb_mode", "offline"]
    toy_stage.main(args(part, shards, 6, "--train.save_every", "3", *wb))
    # a crash after step 5 was logged but before its save: only the step-3 checkpoint survives
    for step, path in list_checkpoints(part / "checkpoints"):
        if step > 3:
            import shutil

            shutil.rmtree(path)
    run_id = (part / "wandb_run_id").read_text().strip()
    toy_stage.main(args(part, shards, 6, *wb))  # resumes from step 3
    steps = [s for s, _ in loss_rows(part)]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # every step once
    assert loss_rows(part) == loss_rows(full)  # and the resumed steps equal the uninterrupted run's
    assert (part / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((part / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # both sessions log to one W&B run


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict, order: list[str]) -> None:
    """A safetensors file with its header keys in ``order`` (the format allows any order)."""
    header: dict = {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        data = tensors[name].tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    full = {"__metadata__": metadata, **header}
    text = json.dumps({k: full[k] for k in order}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_tokenizer_fingerprint_is_of_the_tensors_not_the_file_bytes(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((3, 4)).astype(np.float32),
               "a.bias": rng.standard_normal(5).astype(np.float32)}
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    for d in (one, two, other):
        d.mkdir()
    _write_safetensors(one / "model.safetensors", tensors, {"format": "pt", "model": "EvoTokenizer"},
                       ["__metadata__", "a.bias", "b.weight"])
    _write_safetensors(two / "model.safetensors", tensors, {"model": "EvoTokenizer", "format": "pt"},
                       ["b.weight", "__metadata__", "a.bias"])
    assert (one / "model.safetensors").read_bytes() != (two / "model.safetensors").read_bytes()
    assert all(np.array_equal(load_file(one / "model.safetensors")[k], load_file(two / "model.safetensors")[k])
               for k in tensors)
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(two)
    changed = dict(tensors, **{"a.bias": tensors["a.bias"] + np.float32(1e-6)})
    _write_safetensors(other / "model.safetensors", changed, {"format": "pt"}, ["__metadata__", "a.bias", "b.weight"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(one)


def test_two_exports_of_one_tokenizer_have_one_fingerprint(tmp_path):
    """The real save code, twice, in two processes (safetensors orders its metadata per process)."""
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from conftest import save_tiny_tokenizer; "
            "save_tiny_tokenizer(__import__('pathlib').Path(sys.argv[1]), seed=0)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, cwd=ROOT, env=env, timeout=300)
    assert tokenizer_fingerprint(tmp_path / "a") == tokenizer_fingerprint(tmp_path / "b")
    assert len(tokenizer_fingerprint(tmp_path / "a")) == 64  # sha256 hex


@pytest.mark.slow
def test_kill_9_three_times_then_finish_equals_the_uninterrupted_run(tmp_path):
    """Chaos: a tiny stage-1 run (saving every step, so kills land mid-step and mid-save alike) is SIGKILLed
    at random moments three times, then run to the end; losses and exported weights equal the uninterrupted
    run's bit for bit, and metrics.jsonl has every step once."""
    import random
    import signal
    import time

    from safetensors.numpy import load_file
    from test_stage1 import args as stage1_args

    from data.shapes_cli import DatasetConfig, write_dataset

    shapes = tmp_path / "shapes"
    write_dataset(DatasetConfig(out=str(shapes), n=48, n_val=16, shard_size=16, workers=0, geneval_per_tag=2),
                  log=lambda *_: None)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WANDB_SERVICE")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline")  # each run starts its own W&B service, as a user's does
    steps = 40

    def command(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "launch" / "stage1.py"),
                *stage1_args(shapes, out, steps, "--train.save_every", "1", "--train.keep_last", "2",
                             "--train.threads", "1")]

    full, chaos = tmp_path / "full", tmp_path / "chaos"
    subprocess.run(command(full), check=True, cwd=ROOT, env=env, timeout=600, capture_output=True)
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "15")))  # CHAOS_SEED=n: other kill moments
    kills = 0
    while kills < 3:
        start = latest_step(chaos)
        log = tmp_path / f"chaos-{kills}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(command(chaos), cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        target = start + rng.randint(1, 4)  # let this process save 1-4 new checkpoints
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and latest_step(chaos) < target:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(rng.uniform(0.0, 0.3))  # then somewhere in a step, a validation or a save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    res = subprocess.run(command(chaos), cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert loss_rows(chaos) == loss_rows(full)
    steps_logged = [s for s, _ in loss_rows(chaos)]
    assert steps_logged == list(range(1, steps + 1))
    run_id = (chaos / "wandb_run_id").read_text().strip()
    runs = list((chaos / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run, resumed 3 times
    a = load_file(full / "export" / "tokenizer" / "model.safetensors")
    b = load_file(chaos / "export" / "tokenizer" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def latest_step(run: Path) -> int:
    ckpt = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    return int(ckpt.name.split("_")[1]) if ckpt is not None else 0
