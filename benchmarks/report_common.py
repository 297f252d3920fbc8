"""What the report modules (report.py, report_other.py, plots.py) share: the guard tasks in report
order, and how a cell of BENCHMARKS.md writes a number, a hyperparameter and a result's provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TASKS = ("hate", "offensive", "emotion", "irony", "injection")


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``-`` for anything else (a missing figure)."""
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def fmt_hp(v: Any) -> str:
    """A hyperparameter value: floats to 3 significant digits, dicts key by key."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_hp(x)}" for k, x in v.items()) + "}"
    return str(v)


def fmt_produced(entry: Mapping[str, Any]) -> str:
    """``commit date`` of the run that produced ``entry`` (``?`` when it does not say)."""
    p = entry.get("produced") or {}
    return f"{p.get('commit', '?')} {p.get('date', '')[:10]}".strip()


def replace_block(text: str, name: str, lines: list[str]) -> str:
    """``text`` (the README) with its block ``name``, between ``<!-- NAME:start -->`` and
    ``<!-- NAME:end -->``, replaced by ``lines``; unchanged when the markers are absent."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}"
