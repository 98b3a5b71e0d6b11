"""Commands: the one way every ``unimllm`` command reads its command line.

Two shapes of command, one spelling. Config-driven commands (the stage launchers, ``launch/evaluate.py``,
the shapes world, the loader check) take ``[--config FILE] [--dotted.key VALUE ...]`` over a config dataclass
(:func:`parse_cli`; ``--help`` lists every field with its docstring). Tool commands (``unimllm ...``, the shard
builder, validator, code precomputation, converter, probe) take flags through :class:`FlagParser`. Flags are
spelled like the fields and arguments they set, words joined by ``_`` (``--max_new_tokens``,
``--train.max_steps``); the ``-`` spelling (``--max-new-tokens``, ``--train.max-steps``) is accepted everywhere
as the same flag. Every command takes ``--no_progress``. A bad value is one ``config error:`` / ``error:`` line
and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from unimllm.config import (
    CLI_SOURCE,
    ConfigError,
    _hints,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
    type_name,
)
from unimllm.logging import set_progress

T = TypeVar("T")
NO_PROGRESS = "--no_progress"


class FlagParser(argparse.ArgumentParser):
    """argparse with the project's spelling: each long flag is registered as ``--a_b`` (shown) and ``--a-b``
    (accepted), and every command gets ``--no_progress``. ``parse_args`` applies ``--no_progress``."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a prefix is never a flag: --n is --n, not --no_progress
        super().__init__(*args, **kwargs)
        if self.add_help:  # not on a parents=[...] parser: the child has its own
            self.add_argument(NO_PROGRESS, action="store_true", default=argparse.SUPPRESS,
                              help="no progress bars (shown only on a terminal, on rank 0)")

    def add_argument(self, *names: str, **kwargs: Any):
        return super().add_argument(*_spellings(names), **kwargs)

    def add_subparsers(self, **kwargs: Any):
        kwargs.setdefault("parser_class", FlagParser)
        return super().add_subparsers(**kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        if getattr(ns, "no_progress", False):
            set_progress(False)
        return ns


def pop_no_progress(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--no_progress`` (either spelling); progress bars off when it was there."""
    rest = [a for a in argv if a not in (NO_PROGRESS, "--no-progress")]
    if len(rest) != len(argv):
        set_progress(False)
    return rest


def _spellings(names: Sequence[str]) -> list[str]:
    """``("--max-new-tokens",)`` -> ``["--max_new_tokens", "--max-new-tokens"]`` (argparse's dest: the first)."""
    out: list[str] = []
    for name in names:
        if name.startswith("--") and ("-" in name[2:] or "_" in name[2:]):
            for spelled in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                if spelled not in out:
                    out.append(spelled)
        else:
            out.append(name)
    return out


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field), merged over the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_fields(cls: type, prefix: str = ""):
    """Yield ``(dotted_key, annotation, default, doc)`` for every leaf field of a config tree."""
    docs, hints = field_docs(cls), _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key)
            continue
        item = (typing.get_args(tp) or (None,))[0]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item):
            yield key, tp, to_dict(f.default_factory()), docs.get(f.name, "")  # type: ignore[misc]
            yield from iter_fields(item, f"{key}.N")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        yield key, tp, default, docs.get(f.name, "")


def help_text(cls: type) -> str:
    lines = [f"{cls.__name__} options (CLI > YAML > defaults):"]
    for key, tp, default, doc in iter_fields(cls):
        d = "required" if default is dataclasses.MISSING else f"default {default!r}"
        lines.append(f"  --{key}  ({type_name(tp)}; {d})")
        if doc:
            lines.extend("      " + ln for ln in textwrap.wrap(doc, 90))
    return "\n".join(lines)


def split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[--config FILE | -c FILE | --config=FILE] rest...`` -> (FILE or None, rest).

    Drops the ``--local_rank=N`` that the ``deepspeed`` launcher appends (LOCAL_RANK is in the environment).
    """
    path, rest, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        if argv[i].startswith("--local_rank="):
            i += 1
        elif argv[i] == "--local_rank":
            i += 2
        elif argv[i] in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config", "needs a file path", CLI_SOURCE)
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return path, rest


def preset_defaults(cls: type, path: str | Path | None, overrides: Sequence[str], preset_key: str,
                    presets: Callable[[str], dict]) -> dict:
    """The defaults layer of a preset named by ``preset_key`` (CLI > YAML > the field's default)."""
    from_cli = [v for k, v in parse_overrides(overrides) if k == preset_key]
    from_yaml = read_yaml(path).get(preset_key) if path is not None else None
    default = next(f.default for f in dataclasses.fields(cls) if f.name == preset_key)
    name = from_cli[-1] if from_cli else from_yaml if from_yaml is not None else default
    source = CLI_SOURCE if from_cli else str(path) if from_yaml is not None else "defaults"
    try:
        return {preset_key: name, **presets(name)}
    except ConfigError as e:
        raise ConfigError(preset_key, e.message, source) from None


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, *, default_config: str | Path | None = None,
              preset_key: str | None = None, presets: Callable[[str], dict] | None = None) -> T:
    """Entry-point helper: ``[--config FILE] [--dotted.key VALUE ...] [--help]`` -> validated config.

    With ``preset_key``/``presets``, the field ``preset_key`` names a preset whose dict (e.g. a model
    config) layers between the dataclass defaults and the YAML. Prints ``--help`` and exits 0; prints a
    ConfigError and exits 2 (no traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls) + f"\n\n{NO_PROGRESS}: no progress bars (they show only on a terminal, on rank 0)")
        raise SystemExit(0)
    argv = pop_no_progress(argv)
    try:
        path, rest = split_config_arg(argv)
        path = path or default_config
        defaults = preset_defaults(cls, path, rest, preset_key, presets) if preset_key and presets else None
        return load_config(cls, path, rest, defaults=defaults)
    except ConfigError as e:
        exit_with(e)
    raise AssertionError("unreachable")


def exit_with(e: ConfigError) -> None:
    """Print a config error for a command-line user (no traceback) and exit with status 2."""
    print(f"config error: {e}", file=sys.stderr)
    raise SystemExit(2)
