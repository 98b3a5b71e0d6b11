"""train.precision / eval precision ``auto``: bf16 only where the device computes it natively, fp32 elsewhere;
the choice and its reason land in the run's config; the AVX2 emulation is detected as a plain AVX2 CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_stage  # tests/assets/ is on pytest's pythonpath
import yaml
from PIL import Image

from data.schema import make_sample
from data.shard_writer import ShardWriter
from unimllm.precision import (
    AVX2_EMULATION,
    FORCE_ENV,
    cpu_bf16_flags,
    native_bf16,
    resolve_eval_precision,
    resolve_train_precision,
)

ROOT = Path(__file__).resolve().parents[1]


def test_auto_resolves_by_the_hook(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "0")
    assert resolve_train_precision("auto", "cpu") == ("fp32", f"auto: {FORCE_ENV}=0")
    monkeypatch.setenv(FORCE_ENV, "1")
    assert resolve_train_precision("auto", "cpu") == ("bf16-autocast", f"auto: {FORCE_ENV}=1")
    for asked in ("fp32", "bf16", "fp16", "bf16-autocast"):  # explicit choices are never overridden
        assert resolve_train_precision(asked, "cpu") == (asked, "asked for explicitly")
    # evaluation on a CPU stays fp32 even where bf16 is native; explicit bf16 is honoured
    assert resolve_eval_precision("auto", "cpu")[0] == "fp32"
    assert resolve_eval_precision("bf16", "cpu")[0] == "bf16"


def _detect(env: dict[str, str]) -> dict:
    code = ("import json, torch; from unimllm.precision import native_bf16, resolve_train_precision; "
            "ok, why = native_bf16('cpu'); print(json.dumps({'native': ok, 'why': why, "
            "'precision': resolve_train_precision('auto', 'cpu')[0], "
            "'capability': torch.backends.cpu.get_cpu_capability()}))")
    base = {k: v for k, v in os.environ.items() if k not in (FORCE_ENV, *AVX2_EMULATION)}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_avx2_emulation_is_detected_as_no_native_bf16():
    """Under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 every x86 CPU is a
    plain AVX2 machine: auto picks fp32 (on this CI machine too, whatever its flags)."""
    got = _detect(AVX2_EMULATION)
    assert got["native"] is False and got["precision"] == "fp32"
    if torch.backends.cpu.get_cpu_capability() != "NO AVX":
        assert got["capability"] in ("AVX2", "DEFAULT", "NO AVX")


def test_native_cpu_detection_matches_the_flags():
    has = bool(cpu_bf16_flags())
    got = _detect({})
    assert got["native"] is bool(has and "AVX512" in got["capability"]), got
    assert got["precision"] == ("bf16-autocast" if got["native"] else "fp32")


def test_only_isa_limits_below_bf16_count(monkeypatch):
    if not cpu_bf16_flags() or "AVX512" not in torch.backends.cpu.get_cpu_capability():
        pytest.skip("needs a CPU with native bf16")
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16("cpu")[0] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert native_bf16("cpu")[0] is False


@pytest.mark.parametrize(("native", "expected"), [("0", "fp32"), ("1", "bf16-autocast")])
def test_run_config_records_the_choice(tmp_path, monkeypatch, native, expected):
    """A run with precision auto writes what it resolved to, and why, into its config.yaml."""
    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path / "toy-%06d.tar"), max_samples=20) as w:
        for i in range(8):
            w.write(make_sample(f"t{i:04d}", Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
                                {"task": "reconstruct"}))
    monkeypatch.setenv(FORCE_ENV, native)
    out = tmp_path / "run"
    toy_stage.main(["--run.out_dir", str(out), "--run.wandb_mode", "disabled", "--data.sources.0.shards",
                    str(tmp_path / "toy-000000.tar"), "--train.steps", "2", "--train.device", "cpu",
                    "--train.precision", "auto"])
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert train["precision"] == expected
    assert train["precision_reason"] == f"auto: {FORCE_ENV}={native}"
