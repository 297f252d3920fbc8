"""Documentation generated from the method registry and the config's step sections
(``python -m guardmerge.docs README.md``).

The README's methods table lives between ``<!-- methods-table:start -->`` and
``<!-- methods-table:end -->``, the steps' settings between ``<!-- steps-table:start -->`` and
``<!-- steps-table:end -->``; a test fails when either is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from guardmerge.config import AlignConfig, HealConfig, StatsConfig
from guardmerge.methods import METHODS
from guardmerge.methods.registry import _type_name

START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
STEPS_START, STEPS_END = "<!-- steps-table:start -->", "<!-- steps-table:end -->"

STEPS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("statistics", StatsConfig, "Grams / Fishers of the experts computed from `data` (methods that need them)"),
    ("heal", HealConfig, "label-free distillation from the experts after the merge; the one step that trains weights"),
    ("align_heads", AlignConfig, "closed-form refit of every head against its expert, the last step"),
)
"""The config sections of the steps that run beside the method: (key, schema, summary)."""


def step_rows(schema: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` of each setting of a step's section."""
    rows = []
    for name, info in schema.model_fields.items():
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        rows.append((name, _type_name(info.annotation), default, info.description or ""))
    return rows


def steps_table() -> str:
    """A Markdown table of every step section's settings and defaults."""
    lines = ["| step (config key) | what it does | settings |", "|---|---|---|"]
    for key, schema, summary in STEPS:
        settings = ", ".join(f"`{n}`={d}" for n, _, d, _ in step_rows(schema))
        lines.append(f"| `{key}:` | {summary}. | {settings} |")
    return "\n".join(lines)


def steps_text() -> str:
    """The steps part of ``guardmerge methods``: each section, its summary and its settings."""
    lines = ["Steps (config sections beside the method; override with -s KEY.SETTING=VALUE):", ""]
    for key, schema, summary in STEPS:
        lines += [f"{key}:", f"  {summary}"]
        lines += [f"    {n:<14} {t:<24} default {d:<10} {desc}" for n, t, d, desc in step_rows(schema)]
        lines.append("")
    return "\n".join(lines)


def methods_table() -> str:
    """A Markdown table of every registered method, its summary and parameter defaults."""
    lines = ["| method | summary | parameters |", "|---|---|---|"]
    for spec in METHODS:
        params = ", ".join(f"`{n}`={d}" for n, _, d, _ in spec.parameter_rows())
        needs = f" Needs: {', '.join(sorted(spec.needs))}." if spec.needs else ""
        lines.append(f"| `{spec.name}` | {spec.summary}{needs} | {params} |")
    return "\n".join(lines)


def methods_json() -> dict[str, dict[str, Any]]:
    """``guardmerge methods --json``: ``methods`` (each method's summary, reference, needs and
    parameters) and ``steps`` (each step section's summary and settings: statistics, heal,
    align_heads)."""
    methods = {
        s.name: {
            "summary": s.summary,
            "reference": s.reference,
            "needs": sorted(s.needs),
            "parameters": {n: {"type": t, "default": d, "description": desc} for n, t, d, desc in s.parameter_rows()},
        }
        for s in METHODS
    }
    steps = {
        key: {
            "summary": summary,
            "settings": {n: {"type": t, "default": d, "description": desc} for n, t, d, desc in step_rows(schema)},
        }
        for key, schema, summary in STEPS
    }
    return {"methods": methods, "steps": steps}


def methods_text() -> str:
    """``guardmerge methods``: each method, what it needs, its reference and its parameters."""
    lines = []
    for spec in METHODS:
        needs = f"  [needs: {', '.join(sorted(spec.needs))}]" if spec.needs else ""
        lines += [f"{spec.name}{needs}", f"  {spec.summary}"]
        if spec.reference:
            lines.append(f"  ref: {spec.reference}")
        lines += [f"    {n:<14} {t:<24} default {d:<10} {desc}" for n, t, d, desc in spec.parameter_rows()]
        lines.append("")
    return "\n".join([*lines, steps_text()])


def _replace(text: str, start: str, end: str, table: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def update(path: Path) -> bool:
    """Rewrite the tables in ``path``; return True when one changed."""
    text = path.read_text()
    new = _replace(text, START, END, methods_table())
    if STEPS_START in new:
        new = _replace(new, STEPS_START, STEPS_END, steps_table())
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["README.md"]:
        update(Path(arg))
