"""The plots of BENCHMARKS.md, drawn from the guard benchmark's results (benchmarks/results/guard.json)
with matplotlib when it is installed (the ``bench`` extra); called by benchmarks/report.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from report_common import TASKS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Plot = Callable[[Any, dict], "Figure | None"]
"""``draw(plt, res)``: a figure from the results, or None when they hold nothing to draw."""


def plots(res: dict, out_dir: Path) -> list[str]:
    """Draw every plot the results have data for into ``out_dir``; the file names made (none
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for name, draw in PLOTS:
        fig = draw(plt, res)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def quality_plot(plt: Any, res: dict) -> Figure | None:
    """Test macro-F1 per task and the mean of every quality row, against the experts' mean."""
    tasks = [t for t in TASKS if t in res["experts"]]
    methods = sorted(res.get("methods", {}), key=lambda k: res["methods"][k]["mean_macro_f1"])
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / (len(tasks) + 1)
    for i, t in enumerate(tasks):
        ax.bar(
            [j + i * width for j in range(len(methods))],
            [res["methods"][m]["test"][t]["macro_f1"] for m in methods],
            width,
            label=t,
        )
    ax.bar(
        [j + len(tasks) * width for j in range(len(methods))],
        [res["methods"][m]["mean_macro_f1"] for m in methods],
        width,
        label="mean",
        color="black",
    )
    ax.axhline(res["experts_mean_macro_f1"], color="grey", linestyle="--", label="experts' mean")
    ax.set_xticks([j + 0.4 for j in range(len(methods))], methods, rotation=45, ha="right")
    ax.set_ylabel("test macro-F1")
    ax.set_title("Five guard experts merged into one five-head model")
    ax.legend(ncol=3, fontsize=8)
    return fig


def density_plot(plt: Any, res: dict) -> Figure | None:
    """HM3 self-merging: each expert's normalised macro-F1 against density, one panel per method."""
    if "density_sweep" not in res:
        return None
    sweep = res["density_sweep"]
    fig, axes = plt.subplots(1, len(sweep), figsize=(6 * len(sweep), 4), sharey=True)
    axes = axes if len(sweep) > 1 else [axes]
    for ax, (method, curves) in zip(axes, sweep.items()):
        for task, curve in curves.items():
            ax.plot([c["density"] for c in curve], [c["normalized"] for c in curve], marker="o", label=task)
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_title(f"self-merge, {method}")
        ax.set_xlabel("density (kept fraction)")
    axes[0].set_ylabel("macro-F1 / expert macro-F1")
    axes[-1].legend()
    return fig


def frontier_plot(plt: Any, res: dict) -> Figure | None:
    """Sharing depth: normalised and worst-task quality against measured throughput."""
    if not res.get("frontier"):
        return None
    fr = res["frontier"]["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r.get("batch32_texts_per_s", 0) for r in fr.values()]
    ax.plot(xs, [r["normalized"] for r in fr.values()], marker="o", label="normalised (mean)")
    ax.plot(xs, [r.get("worst_task_ratio") or 0 for r in fr.values()], marker="s", linestyle="--", label="worst task")
    for (name, r), x in zip(fr.items(), xs):
        ax.annotate(name, (x, r["normalized"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("texts/s at batch 32 (measured)")
    ax.set_ylabel("merged / expert macro-F1")
    ax.set_title("Sharing depth: quality vs throughput")
    ax.legend()
    return fig


def speed_plot(plt: Any, res: dict) -> Figure | None:
    """The merged model against the five experts: throughput at batch 32, p50 latency at batch 1."""
    if "speed" not in res:
        return None
    sp = res["speed"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(
        ["merged", "5 experts"],
        [sp["batch32"]["merged_texts_per_s"], sp["batch32"]["experts_texts_per_s"]],
        color=["C0", "C1"],
    )
    axes[0].set_title("throughput, batch 32 (texts/s)")
    axes[1].bar(
        ["merged", "5 experts"], [sp["batch1"]["merged_p50_ms"], sp["batch1"]["experts_p50_ms"]], color=["C0", "C1"]
    )
    axes[1].set_title("latency p50, batch 1 (ms)")
    return fig


PLOTS: tuple[tuple[str, Plot], ...] = (
    ("quality.png", quality_plot),
    ("density_sweep.png", density_plot),
    ("frontier.png", frontier_plot),
    ("speed.png", speed_plot),
)
"""Every plot, in the order they are drawn: its file name and how it is drawn."""
