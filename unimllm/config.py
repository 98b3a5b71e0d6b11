"""Config system: nested dataclasses, YAML files, dotted CLI overrides, one validation pass.

A stage's config is a tree of small ``@dataclass`` sections with a docstring (a string literal) under
every field, e.g.::

    @dataclass
    class TrainConfig:
        lr: float = 1e-4
        "Peak learning rate."

Precedence is CLI > YAML > dataclass defaults. Every value is type-checked against the field's
annotation; unknown keys, wrong types and contradictions (a section's ``validate()`` method) raise
:class:`ConfigError` naming the file (or ``command line``) and the dotted key, e.g.
``launch/configs/stage1/tiny.yaml: train.batch_size: expected int, got 'abc'``.

Configs are inert: only user knobs, never runtime objects. Derived values belong in ``validate()``
(checks) or in the code that consumes the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

CLI_SOURCE = "command line"


class ConfigError(ValueError):
    """A config problem; ``str()`` is ``"<source>: <dotted.key>: <message>"``."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        parts = [p for p in (source, key) if p]
        super().__init__(": ".join(parts + [message]))

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.message, self.source or source)


# ----------------------------------------------------------------------------- type coercion


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    """Readable name of an annotation, for messages and ``--help``."""
    opt, inner = _is_optional(tp)
    if opt:
        return f"{type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = [type_name(a) for a in typing.get_args(tp) if a is not Ellipsis]
        return f"{origin.__name__}[{', '.join(args)}]"
    if dataclasses.is_dataclass(tp):
        return f"section {tp.__name__}"
    return getattr(tp, "__name__", str(tp))


def _expected(tp: Any, value: Any) -> str:
    return f"expected {type_name(tp)}, got {value!r}"


def coerce(value: Any, tp: Any, key: str, *, from_cli: bool = False) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless; raise ConfigError(key)."""
    opt, inner = _is_optional(tp)
    if opt:
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner, key, from_cli=from_cli)
    if value is None:
        raise ConfigError(key, _expected(tp, value))
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(key, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin in (list, tuple):
        if from_cli and isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v != ""]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, _expected(tp, value))
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{key}.{i}", from_cli=from_cli) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}.{i}", from_cli=from_cli) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, _expected(tp, value))
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {coerce(k, kt, f"{key}.{k}"): coerce(v, vt, f"{key}.{k}", from_cli=from_cli) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, _expected(tp, value))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, _expected(tp, value))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, _expected(tp, value))
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, _expected(tp, value))
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(key, _expected(tp, value))
    raise ConfigError(key, f"unsupported annotation {tp!r} in config schema")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{key}.{name}" if key else name, f"unknown key{hint}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown(prefix, str(name), list(fields))
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without a default that the file does not give
        raise ConfigError(prefix or cls.__name__, str(e)) from None


# ----------------------------------------------------------------------------- public API


def from_dict(cls: type[T], data: dict | None, source: str = "<dict>") -> T:
    """Build and validate ``cls`` from a plain nested dict (e.g. parsed YAML)."""
    try:
        cfg = _build(cls, data or {})
        validate(cfg)
    except ConfigError as e:
        raise e.with_source(source) from None
    return cfg


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML config file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", "config file not found", str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("", f"invalid YAML: {e}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"top level must be a mapping, got {type(data).__name__}", str(path))
    return data


def parse_override_value(raw: str) -> Any:
    """A CLI value as YAML scalar/flow syntax (``3``, ``true``, ``[1,2]``, ``{a: 1}``), else the raw string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(cfg: Any, key: str, raw: Any, *, from_cli: bool = True) -> None:
    """Set ``cfg.<dotted key>`` (list items by index: ``data.sources.0.weight``) with type checking."""
    parts = key.split(".")
    node, path = cfg, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(path)
        if dataclasses.is_dataclass(node):
            fields = _fields(type(node))
            if part not in fields:
                raise _unknown(here, part, list(fields))
            tp = _hints(type(node))[part]
            if last:
                value = raw
                if from_cli and isinstance(raw, str):
                    _, inner = _is_optional(tp)
                    value = raw if inner in (str, Path) else parse_override_value(raw)
                setattr(node, part, coerce(value, tp, key, from_cli=from_cli))
                return
            node = getattr(node, part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last:
                raise ConfigError(key, "cannot replace a whole list item; set its fields")
            node = node[int(part)]
        else:
            raise ConfigError(key, f"cannot index {here or 'config'} with '{part}'")
        path.append(part)


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``["--a.b", "1", "--c=2", "--flag"]`` -> ``[("a.b", "1"), ("c", "2"), ("flag", "true")]``."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError("", f"expected --dotted.key VALUE, got {tok!r}", CLI_SOURCE)
        if "=" in tok:
            k, v = tok[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = tok[2:], argv[i + 1]
            i += 2
        else:  # bare flag: a bool set to true
            k, v = tok[2:], "true"
            i += 1
        out.append((k.replace("-", "_"), v))  # --train.max-steps is --train.max_steps
    return out


def _merge(cls: Any, base: dict, over: dict) -> dict:
    """Layer ``over`` on ``base`` following the schema: config sections merge key by key, every other
    value (including ``dict[...]`` fields such as weights) is replaced whole, as a CLI override does."""
    hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
    out = dict(base)
    for k, v in over.items():
        tp = _is_optional(hints.get(k))[1]
        section = dataclasses.is_dataclass(tp)
        out[k] = _merge(tp, out[k], v) if section and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), *, defaults: dict | None = None
) -> T:
    """Dataclass defaults <- ``defaults`` (e.g. a preset) <- YAML file <- dotted CLI overrides; validate once."""
    source = str(path) if path is not None else "defaults"
    data = _merge(cls, defaults or {}, read_yaml(path) if path is not None else {})
    try:
        cfg = _build(cls, data)
    except ConfigError as e:
        raise e.with_source(source) from None
    for key, raw in parse_overrides(overrides):
        try:
            set_dotted(cfg, key, raw)
        except ConfigError as e:
            raise ConfigError(e.key, e.message, CLI_SOURCE) from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise e.with_source(source + (" + command line" if overrides else "")) from None
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Call ``validate()`` on every section, children first; prefix its errors with the section key."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            validate(item, f"{key}.{i}" if isinstance(value, (list, tuple)) else key)
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            full = ".".join(p for p in (prefix, e.key) if p)
            raise ConfigError(full, e.message) from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe structure (tuples -> lists, Paths -> str)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    from unimllm.files import atomic_write

    return atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
