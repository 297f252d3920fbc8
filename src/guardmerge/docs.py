"""Documentation generated from the method registry (``python -m guardmerge.docs README.md``).

The README's methods table lives between ``<!-- methods-table:start -->`` and
``<!-- methods-table:end -->``; a test fails when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from guardmerge.methods import METHODS

START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def methods_table() -> str:
    """A Markdown table of every registered method, its summary and parameter defaults."""
    lines = ["| method | summary | parameters |", "|---|---|---|"]
    for spec in METHODS:
        params = ", ".join(f"`{n}`={d}" for n, _, d, _ in spec.parameter_rows())
        needs = f" Needs: {', '.join(sorted(spec.needs))}." if spec.needs else ""
        lines.append(f"| `{spec.name}` | {spec.summary}{needs} | {params} |")
    return "\n".join(lines)


def methods_json() -> dict[str, dict[str, Any]]:
    """``guardmerge methods --json``: each method's summary, reference, needs and parameters."""
    return {
        s.name: {
            "summary": s.summary,
            "reference": s.reference,
            "needs": sorted(s.needs),
            "parameters": {n: {"type": t, "default": d, "description": desc} for n, t, d, desc in s.parameter_rows()},
        }
        for s in METHODS
    }


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
    return "\n".join(lines)


def update(path: Path) -> bool:
    """Rewrite the table in ``path``; return True when it changed."""
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{methods_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["README.md"]:
        update(Path(arg))
