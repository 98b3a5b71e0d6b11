"""Config system: YAML + dotted CLI precedence, validation messages naming file and key, dump, --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from unimllm.command_line import field_docs, help_text, parse_cli
from unimllm.config import ConfigError, dump_config, from_dict, load_config


@dataclass
class OptimConfig:
    lr: float = 1e-4
    "Learning rate."
    betas: tuple[float, float] = (0.9, 0.95)
    "Adam betas."


@dataclass
class Part:
    name: str = "a"
    "Name."
    weight: float = 1.0
    "Weight."


@dataclass
class TrainConfig:
    batch_size: int = 8
    "Micro batch."
    steps: int = 100
    "Steps."
    warmup_steps: int = 0
    "Warm-up steps."
    precision: Literal["fp32", "bf16"] = "fp32"
    "Precision."
    resume: bool = False
    "Resume."
    init_from: Optional[str] = None
    "Checkpoint to start from."
    optim: OptimConfig = field(default_factory=OptimConfig)
    "Optimiser."

    def validate(self) -> None:
        if self.warmup_steps > self.steps:
            raise ConfigError("warmup_steps", f"({self.warmup_steps}) exceeds steps ({self.steps})")


@dataclass
class RootConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    "Training."
    parts: list[Part] = field(default_factory=list)
    "Parts."
    tags: list[str] = field(default_factory=list)
    "Tags."
    weights: dict[str, float] = field(default_factory=dict)
    "Named weights."


def write(tmp_path: Path, data: dict, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, {"train": {"batch_size": 4, "steps": 10, "optim": {"lr": 0.001}}})
    cfg = load_config(RootConfig, path, ["--train.steps", "20", "--train.optim.betas=[0.8,0.99]"])
    assert cfg.train.batch_size == 4  # YAML
    assert cfg.train.steps == 20  # CLI beats YAML
    assert cfg.train.optim.lr == 0.001 and cfg.train.optim.betas == (0.8, 0.99)
    assert cfg.train.precision == "fp32"  # default


def test_cli_value_forms(tmp_path):
    cfg = load_config(RootConfig, None, ["--train.optim.lr", "1e-4", "--train.resume", "--train.init_from", "runs/x",
                                         "--tags", "a,b", "--train.precision", "bf16"])
    assert cfg.train.optim.lr == 1e-4 and cfg.train.resume is True and cfg.train.init_from == "runs/x"
    assert cfg.tags == ["a", "b"] and cfg.train.precision == "bf16"
    cfg = load_config(RootConfig, None, ["--train.init_from", "none"])
    assert cfg.train.init_from is None


def test_list_of_sections_and_item_override(tmp_path):
    path = write(tmp_path, {"parts": [{"name": "x"}, {"name": "y", "weight": 2}]})
    cfg = load_config(RootConfig, path, ["--parts.1.weight", "3"])
    assert [(p.name, p.weight) for p in cfg.parts] == [("x", 1.0), ("y", 3.0)]


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, {"train": {"batch_size": "abc"}})
    with pytest.raises(ConfigError) as e:
        load_config(RootConfig, path)
    assert str(e.value) == f"{path}: train.batch_size: expected int, got 'abc'"


def test_wrong_type_from_cli_names_command_line():
    with pytest.raises(ConfigError, match=r"^command line: train.batch_size: expected int, got 'abc'$"):
        load_config(RootConfig, None, ["--train.batch_size", "abc"])


def test_typo_key_is_rejected_with_suggestion(tmp_path):
    path = write(tmp_path, {"train": {"bacth_size": 4}})
    with pytest.raises(ConfigError, match=r"tiny.yaml: train.bacth_size: unknown key \(did you mean 'batch_size'\?\)"):
        load_config(RootConfig, path)
    with pytest.raises(ConfigError, match=r"command line: train.optim.l: unknown key"):
        load_config(RootConfig, None, ["--train.optim.l", "1"])


def test_contradiction_rejected_once_after_overrides(tmp_path):
    path = write(tmp_path, {"train": {"steps": 10, "warmup_steps": 5}})
    load_config(RootConfig, path)
    with pytest.raises(ConfigError, match=r"tiny.yaml \+ command line: train.warmup_steps: \(50\) exceeds steps"):
        load_config(RootConfig, path, ["--train.warmup_steps", "50"])


@pytest.mark.parametrize("bad,msg", [
    ({"train": {"precision": "fp8"}}, "train.precision: expected one of 'fp32', 'bf16', got 'fp8'"),
    ({"train": {"resume": "yes please"}}, "train.resume: expected bool"),
    ({"train": {"optim": {"betas": [0.9]}}}, "train.optim.betas: expected 2 items, got 1"),
    ({"train": 3}, "train: expected a mapping"),
    ({"parts": [{"nme": "x"}]}, "parts.0.nme: unknown key"),
    ({"train": {"steps": 1.5}}, "train.steps: expected int, got 1.5"),
])
def test_type_errors(tmp_path, bad, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(RootConfig, write(tmp_path, bad))


def test_bad_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RootConfig, tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(RootConfig, tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RootConfig, tmp_path / "list.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(RootConfig, write(tmp_path, {"parts": [{"name": "p"}]}), ["--train.steps", "7"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(RootConfig, out)
    assert again == cfg and not list((tmp_path / "run").glob("*.tmp"))


def test_field_docs_and_help():
    assert field_docs(TrainConfig)["batch_size"] == "Micro batch."
    text = help_text(RootConfig)
    assert "--train.optim.lr  (float; default 0.0001)" in text and "Learning rate." in text
    assert "--parts.N.weight  (float; default 1.0)" in text  # fields inside list items are documented


def test_parse_cli_exits_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(RootConfig, ["--help"])
    assert e.value.code == 0 and "--train.batch_size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        parse_cli(RootConfig, ["--config", str(write(tmp_path, {"train": {"steps": "x"}}))])
    assert e.value.code == 2 and "train.steps: expected int, got 'x'" in capsys.readouterr().err
    cfg = parse_cli(RootConfig, ["-c", str(write(tmp_path, {"train": {"steps": 3}})), "--train.batch_size", "2"])
    assert (cfg.train.steps, cfg.train.batch_size) == (3, 2)
    cfg = parse_cli(RootConfig, ["--train.steps", "4", "--local_rank=1"])  # what the deepspeed launcher appends
    assert cfg.train.steps == 4


def test_from_dict_names_source():
    with pytest.raises(ConfigError, match=r"^ckpt/meta.json: train.steps: expected int"):
        from_dict(RootConfig, {"train": {"steps": "many"}}, "ckpt/meta.json")


def test_defaults_layer_merges_sections_but_replaces_dict_values(tmp_path):
    """A preset under the YAML: sections merge key by key; a dict-typed field is replaced whole."""
    preset = {"train": {"steps": 50, "batch_size": 2}, "weights": {"a": 1.0, "b": 1.0}}
    path = write(tmp_path, {"train": {"steps": 7}, "weights": {"b": 3.0}})
    cfg = load_config(RootConfig, path, [], defaults=preset)
    assert (cfg.train.steps, cfg.train.batch_size) == (7, 2)  # YAML over preset, preset over defaults
    assert cfg.weights == {"b": 3.0}  # same as `--weights "{b: 3}"` would give
    assert load_config(RootConfig, None, ["--weights", "{b: 3}"], defaults=preset).weights == {"b": 3.0}


# ----------------------------------------------------------------------------- one command-line spelling


def test_flags_take_both_spellings_and_help_shows_one(capsys):
    from unimllm.command_line import FlagParser

    p = FlagParser(prog="x")
    p.add_argument("--max_new_tokens", type=int, default=1)
    p.add_argument("--top-k", type=int, default=0)
    assert p.parse_args(["--max-new-tokens", "5", "--top_k", "3"]).max_new_tokens == 5
    ns = p.parse_args(["--max_new_tokens", "7", "--top-k", "2"])
    assert (ns.max_new_tokens, ns.top_k) == (7, 2)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    usage = capsys.readouterr().out
    assert "--max_new_tokens MAX_NEW_TOKENS, --max-new-tokens" in usage and "--no_progress" in usage


def test_dotted_keys_take_both_spellings():
    from unimllm.config import parse_overrides

    assert parse_overrides(["--train.max-steps", "3", "--run.out_dir=x"]) == [("train.max_steps", "3"),
                                                                               ("run.out_dir", "x")]


def test_no_progress_turns_every_bar_off(monkeypatch):
    import sys

    from unimllm import logging as ulog
    from unimllm.command_line import FlagParser

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(ulog, "_PROGRESS", {"enabled": True})
    assert not ulog.progress_bar(range(3), desc="t").disable
    assert ulog.progress_bar(range(3), desc="t", main=False).disable  # rank 0 only
    FlagParser(prog="x").parse_args(["--no-progress"])
    assert ulog.progress_bar(range(3), desc="t").disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(ulog, "_PROGRESS", {"enabled": True})
    assert ulog.progress_bar(range(3), desc="t").disable  # not a terminal: no bar
