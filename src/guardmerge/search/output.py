"""Writing a search's result: the best merge as a normal model folder, with its summary.

The folder holds the merged model (as ``guardmerge merge`` writes it), ``search.json`` (the best
candidate, seconds per trial, every trial), ``search_history.png`` (objective per trial and best
so far) and a model card with a search section.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from guardmerge.search.objective import MergeScorer
from guardmerge.search.study import SearchOutcome

log = logging.getLogger(__name__)


def history_png(outcome: SearchOutcome, title: str = "") -> bytes | None:
    """The optimisation history as PNG bytes (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no search_history.png (pip install 'guardmerge[search]')")
        return None
    done = [t for t in outcome.trials if t["state"] == "COMPLETE"]
    pruned = [t for t in outcome.trials if t["state"] == "PRUNED"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t["number"] for t in done], [t["value"] for t in done], s=14, label="complete")
    if pruned:
        partial = [sum(t["scores"].values()) / len(t["scores"]) if t.get("scores") else float("nan") for t in pruned]
        ax.scatter(
            [t["number"] for t in pruned],
            partial,
            s=10,
            marker="x",
            alpha=0.5,
            label="pruned (mean of the tasks scored)",
        )
    best, xs, ys = float("-inf"), [], []
    for t in sorted(done, key=lambda r: r["number"]):
        best = max(best, t["value"])
        xs.append(t["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective ({outcome.settings.get('objective', 'mean')} validation macro-F1)")
    ax.set_title(title or f"search: {outcome.space.get('method', '')}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def card_section(outcome: SearchOutcome) -> str:
    """Markdown for the model card."""
    s = outcome.settings
    scores = ", ".join(f"{t} {v:.4f}" for t, v in outcome.best_scores.items())
    params = ", ".join(f"`{k}={v}`" for k, v in outcome.best.parameters.items()) or "(defaults)"
    return "\n".join(
        [
            "## Search",
            "",
            (
                f"Chosen by `guardmerge search`: {sum(outcome.counts.values())} trials "
                f"({', '.join(f'{n} {k.lower()}' for k, n in outcome.counts.items())}), sampler `{s['sampler']}` "
                f"(seed {s['seed']}), objective: {s['objective']} validation macro-F1."
            ),
            "",
            f"- Best trial {outcome.best_number}: objective {outcome.best_value:.4f} ({scores})",
            f"- Parameters: {params}; weights: {list(outcome.best.weights)}",
            f"- Median seconds per trial: {outcome.seconds_per_trial:.1f}",
            "- Every trial: `search.json`; history: `search_history.png`.",
        ]
    )


def write_best(
    scorer: MergeScorer, outcome: SearchOutcome, out: str | Path, *, force: bool = False, progress: bool = True
) -> Path:
    """Merge the best candidate once more and write it to ``out`` with the search summary."""
    from guardmerge.merge.stages import build
    from guardmerge.merge.write import write_result

    job = scorer.config_for(outcome.best)
    result = build(job, progress=progress, stats=scorer.statistics(job), feature_cache=scorer.features)
    result.info.setdefault("card_sections", []).append(card_section(outcome))
    summary: dict[str, Any] = outcome.summary()
    extra = {"search.json": (json.dumps(summary, indent=2, default=str) + "\n").encode()}
    png = history_png(outcome)
    if png is not None:
        extra["search_history.png"] = png
    write_result(result, out, job.config, force=force, extra_files=extra)
    return Path(out)
