"""MME-style yes/no answers: parsing as the official eval_tool does."""

from __future__ import annotations


def parse_yes_no(reply: str) -> str:
    """'yes' / 'no' when the reply starts with it (case-insensitive, after whitespace), else 'other'
    (the official tool counts 'other' as wrong)."""
    r = reply.strip().lower()
    if r.startswith("yes"):
        return "yes"
    if r.startswith("no"):
        return "no"
    return "other"
