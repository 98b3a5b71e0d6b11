"""Validate WebDataset shards against the unimllm sample schema (docs/data.md).

Reads every sample of every shard, decodes its image and runs :func:`data.schema.check_sample`;
tar-level problems come from :func:`data.tar_index.index_shard` (``errors`` and :class:`ShardError`),
and a key seen twice in the set is a ``duplicate_key``. Exit status 1 on any problem. Example::

    python -m data.validate 'out/train-{000000..000003}.tar' --json report.json
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

from data.schema import check_sample
from data.tar_index import (
    BAD_MEMBER,
    CORRUPT_TAR,
    DUPLICATE_MEMBER,
    TRUNCATED,
    ShardError,
    index_shard,
    read_sample,
)
from unimllm.command_line import FlagParser
from unimllm.logging import progress_bar

UNUSABLE_SHARD = "unusable_shard"
DUPLICATE_KEY = "duplicate_key"
TAR_KINDS = (UNUSABLE_SHARD, CORRUPT_TAR, TRUNCATED, BAD_MEMBER, DUPLICATE_MEMBER)


@dataclass
class ValidationReport:
    """Totals, problem counts per kind, and the first few examples of each kind."""

    shards: int = 0
    samples: int = 0
    valid: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def ok(self) -> bool:
        return self.shards > 0 and not self.errors

    @property
    def tar_errors(self) -> int:
        return sum(n for kind, n in self.errors.items() if kind in TAR_KINDS)

    def add(self, kind: str, example: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "invalid": self.samples - self.valid, "tar_errors": self.tar_errors, "ok": self.ok}

    def format(self) -> str:
        lines = [
            f"{self.shards} shards, {self.samples} samples: {self.valid} valid, "
            f"{self.samples - self.valid} invalid, {self.tar_errors} tar errors"
        ]
        for kind in sorted(self.errors):
            lines.append(f"  {kind}: {self.errors[kind]}")
            lines += [f"    {ex}" for ex in self.examples[kind]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def unique_paths(paths: Iterable[str]) -> list[str]:
    """``paths`` without repeats of the same file (compared by resolved path), in first-seen order."""
    seen: set[str] = set()
    out = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def expand(patterns: Iterable[str]) -> list[str]:
    """Shard paths from paths, brace patterns (``a-{000..003}.tar``) and folders (their ``*.tar``).

    A shard named twice (e.g. by its path and by its folder) is listed once, where first named.
    """
    paths: list[str] = []
    for pattern in patterns:
        for path in braceexpand.braceexpand(pattern):
            if os.path.isdir(path):
                paths += sorted(str(p) for p in Path(path).glob("*.tar"))
            else:
                paths.append(path)
    return unique_paths(paths)


def validate(paths: Iterable[str], *, max_examples: int = 5, progress: bool = False) -> ValidationReport:
    """Check every sample of every shard (each file once, see :func:`unique_paths`); problems are counted,
    never raised."""
    report = ValidationReport(max_examples=max_examples)
    first_seen: dict[str, str] = {}
    for path in progress_bar(unique_paths(paths), enabled=progress, unit="shard", desc="validate"):
        report.shards += 1
        try:
            idx = index_shard(path)
            for kind, message in idx.errors:
                report.add(kind, message)
            with open(path, "rb") as f:
                for i, key in enumerate(idx.keys):
                    problems = check_sample(read_sample(f, idx, i))
                    if key in first_seen:
                        problems.append((DUPLICATE_KEY, f"also in {first_seen[key]}"))
                    else:
                        first_seen[key] = path
                    for kind, message in problems:
                        report.add(kind, f"{path}:{key}: {message}")
                    report.samples += 1
                    report.valid += not problems
        except (ShardError, OSError) as e:
            report.add(UNUSABLE_SHARD, str(e))
    return report


def main(argv: list[str] | None = None) -> int:
    p = FlagParser(prog="python -m data.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", help="shard paths, brace patterns or folders")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--examples", type=int, default=5, help="examples listed per error kind")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    paths = expand(args.shards)
    if not paths:
        print("validate: error: no shards found in " + " ".join(args.shards), file=sys.stderr)
        return 2
    report = validate(paths, max_examples=args.examples, progress=True)
    print(report.format())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
