"""Every YAML under launch/configs/ loads into its dataclass; every config field is documented and used."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from data.config import DataConfig
from data.shapes_config import ShapesConfig
from eval.config import EvalConfig
from unimllm.command_line import field_docs, preset_defaults
from unimllm.config import load_config
from unimllm.stages.alignment_config import Stage2Config
from unimllm.stages.alignment_config import model_presets as stage2_presets
from unimllm.stages.instruct_stage import Stage3Config
from unimllm.stages.teacher_stage import TeacherStageConfig
from unimllm.stages.tokenizer_stage import Stage1Config, model_presets

ROOT = Path(__file__).resolve().parents[1]
# launch/configs/<folder>/*.yaml -> the root config class of that folder. A new folder must be added here.
CONFIG_CLASSES: dict[str, type] = {"data": DataConfig, "stage1": Stage1Config, "stage2": Stage2Config,
                                   "stage3": Stage3Config, "eval": EvalConfig, "teacher": TeacherStageConfig}
PRESETS = {Stage1Config: ("model_preset", model_presets), Stage2Config: ("model_preset", stage2_presets)}  # classes whose YAMLs start from a preset
ROOT_CLASSES = [DataConfig, ShapesConfig, Stage1Config, Stage2Config, Stage3Config, EvalConfig, TeacherStageConfig]
PACKAGES = ("unimllm", "tokenizer", "llm", "data", "eval")
YAMLS = sorted((ROOT / "launch/configs").rglob("*.yaml"))


def test_some_configs_are_shipped():
    assert YAMLS


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_loads(path):
    folder = path.relative_to(ROOT / "launch/configs").parts[0]
    assert folder in CONFIG_CLASSES, f"{path}: no config class registered for launch/configs/{folder}/"
    cls = CONFIG_CLASSES[folder]
    defaults = preset_defaults(cls, path, [], *PRESETS[cls]) if cls in PRESETS else None
    load_config(cls, path, defaults=defaults)


def config_classes() -> list[type]:
    seen: list[type] = []
    todo = list(ROOT_CLASSES)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t):
                    todo.append(t)
    return seen


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def _code_outside(skip: Path) -> str:
    """All package and entry-point code except ``skip`` (the module defining the config)."""
    return "\n".join(p.read_text() for pkg in (*PACKAGES, "launch") for p in (ROOT / pkg).rglob("*.py") if p != skip)


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_field_is_read_somewhere(cls):
    """The reverse of an unknown-key check: a declared knob that no code reads is a silent no-op."""
    module = Path(typing.cast(str, __import__(cls.__module__, fromlist=["x"]).__file__))
    code = _code_outside(module) + "\n" + "\n".join(
        line for line in module.read_text().splitlines() if not re.match(r"^\s+\w+: .*=", line)
    )
    unused = [f.name for f in dataclasses.fields(cls) if not re.search(rf"\.{f.name}\b|[\"']{f.name}[\"']", code)]
    assert not unused, f"{cls.__name__}: fields never read: {unused}"
