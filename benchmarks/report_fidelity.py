"""BENCHMARKS.md's fidelity and heal sections, from guard.json (benchmarks/guard_heal.py's columns)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from report_common import TASKS, fmt, fmt_produced


def _interval(iv: Mapping[str, float] | None, name: str) -> str:
    """``value [low, high]`` of ``name`` in an intervals dict (``-`` when absent)."""
    if not iv or iv.get(name) is None or iv[name] != iv[name]:  # NaN: no task left to score
        return "-"
    return f"{fmt(iv[name])} [{fmt(iv.get(f'{name}_low'))}, {fmt(iv.get(f'{name}_high'))}]"


def fidelity_rows(res: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every row that carries fidelity columns: quality rows, frontier rows, heal rows."""
    for name, m in sorted(res.get("methods", {}).items(), key=lambda kv: -kv[1].get("min_agreement", 0.0)):
        if "fidelity" in m:
            yield name, {**m, "compute_vs_one_pass": m.get("compute_vs_one_pass", 1.0)}
    fr = res.get("frontier") or {}
    for name, r in fr.get("rows", {}).items():
        if "fidelity" in r and name != f"K={fr.get('layers')}":  # K = L is the trunk's quality row
            yield f"{fr['trunk']} {name}", r
    for name, r in (res.get("heal") or {}).get("rows", {}).items():
        yield name, r


def fidelity_table(res: Mapping[str, Any]) -> list[str]:
    """The five-task rows' fidelity section (:func:`agreement_table`)."""
    rows = list(fidelity_rows(res))
    if not rows:
        return []
    tasks = [t for t in TASKS if t in res.get("experts", {})]
    intro = (
        "Each merged head against its own expert on the test texts: **agreement** = share of texts with the "
        "expert's verdict (argmax), on the task's own texts / on the other four tasks' texts (off-task: a guard "
        "sees every prompt). `min` is the lowest of the ten."
    )
    goal = (
        "Goals (issue 23, one pass with heal): every agreement >= 0.97 (own and off-task); normalised >= 0.99 "
        "with the lower end of its interval above 0.97; worst task >= 0.97; mean macro-F1 at or above the "
        "experts'. Without heal the goal stays normalised >= 0.98."
    )
    return agreement_table("## Fidelity: does each head answer like its expert?", intro, rows, tasks, goal)


def seven_fidelity_table(res: Mapping[str, Any]) -> list[str]:
    """The seven-task rows' fidelity (goemotions: the label set at the thresholds; ner: entity F1 of
    the merged head's spans against the expert's)."""
    sev = res.get("seven_task") or {}
    rows = [(k, r) for k, r in sev.get("rows", {}).items() if "fidelity" in r]
    if not rows:
        return []
    intro = (
        "The seven-task rows against their experts on every task's test texts, own / off-task: argmax for "
        "the five single-label heads, the whole label set at the thresholds for goemotions, entity-level F1 of "
        "the spans for ner. Intervals over the five single-label tasks."
    )
    goal = "Goal (issue 23, seven tasks with heal): NER entity F1 >= 0.95 of its expert; every agreement >= 0.95."
    return agreement_table("### Seven tasks: fidelity", intro, rows, list(sev["tasks"]), goal)


def agreement_table(
    title: str, intro: str, rows: list[tuple[str, Mapping[str, Any]]], tasks: list[str], goal: str
) -> list[str]:
    """Agreement with each expert (own-task / off-task texts), the lowest of them, normalised
    macro-F1 with and without the weak experts, worst task, with 95% bootstrap intervals."""
    weak = sorted({t for _, r in rows for t in r.get("weak_experts", [])})
    lines = [
        title,
        "",
        intro + " Normalised macro-F1 and the worst task / expert with 95% bootstrap intervals (1,000 draws "
        "resampling each task's test texts, seed 0). "
        + (
            f"Experts below 0.5 test accuracy ({', '.join(weak)}): a merge drifting toward the majority class can "
            "score above such an expert, so the normalised score is also shown without them."
            if weak
            else ""
        ),
        "",
        "| row | "
        + " | ".join(f"{t} own / off" for t in tasks)
        + " | min | normalised [95%] | normalised w/o weak [95%] | worst task [95%] | mean macro-F1 | compute | "
        "produced |",
        "|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        own, off = r.get("agreement", {}), r.get("off_task_agreement", {})
        cells = [f"{fmt(own.get(t))} / {fmt(off.get(t))}" for t in tasks]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {fmt(r.get('min_agreement'))} | {_interval(r.get('intervals'), 'normalised')} | "
            f"{_interval(r.get('intervals_strong'), 'normalised')} | {_interval(r.get('intervals'), 'worst')} | "
            f"{fmt(r.get('mean_macro_f1'))} | {fmt(r.get('compute_vs_one_pass', 1.0), 2)}x | {fmt_produced(r)} |"
        )
    return [*lines, "", goal, ""]


def heal_table(res: Mapping[str, Any]) -> list[str]:
    """How each heal row was made: settings chosen on validation, steps, held-out agreement, cost."""
    heal = res.get("heal")
    if not heal:
        return []
    trunk = heal["trunk"]
    lines = [
        "## Heal: label-free distillation from the experts",
        "",
        f"Trunk: `{trunk['row']}` (the best training-free row by validation; "
        + ", ".join(f"{k}={v}" for k, v in trunk.get("hyperparameters", {}).items())
        + "). The heal settings were chosen on the validation texts by mean agreement with the experts: "
        + "; ".join(
            f"texts/task {v['heal']['texts']}: {fmt(v['validation_mean_agreement'])} ({fmt(v['seconds'], 0)} s)"
            for v in heal.get("validation", [])
        )
        + f". Chosen: {', '.join(f'{k}={v}' for k, v in heal['settings'].items())}. The pool is every task's "
        "unlabelled training texts; 10% is held out for early stopping. Wall time and the process's peak resident "
        "memory on the 2 cores of this machine.",
        "",
        "| row | train | precision | pool texts | steps (done / kept) | held-out agreement before -> after | "
        "heal s (teachers s) | merge + heal s | peak RSS MB | produced |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in heal.get("rows", {}).items():
        h = r.get("heal", {})
        st = h.get("steps", {})
        lines.append(
            f"| {name} | {h.get('settings', {}).get('train', '-')} | {h.get('precision', 'float32')} | "
            f"{h.get('pool', {}).get('texts', '-')} | "
            f"{st.get('done', '-')} / {st.get('kept', '-')} | {fmt(h.get('agreement_before'))} -> "
            f"{fmt(h.get('agreement_after'))} | {fmt(h.get('seconds'), 0)} ({fmt(h.get('teacher_seconds'), 0)}) | "
            f"{fmt(h.get('merge_and_heal_seconds'), 0)} | "
            f"{fmt(h.get('peak_rss_mb_after'), 0)} | {fmt_produced(r)} |"
        )
    lines += ["", "Goal (issue 23): heal at most 10 minutes for the five-task MiniLM job on these 2 cores.", ""]
    return lines


def plan_table(plan: Mapping[str, Any] | None, tasks: list[str]) -> list[str]:
    """``guardmerge plan`` on the guard experts (benchmarks/guard_plan.py, plan.json): every scored
    plan on validation, then the chosen model's fidelity on test."""
    if not plan:
        return []
    s, p, test = plan["settings"], plan["plan"], plan["test"]
    chosen = p["chosen"]
    lines = [
        "## The planner: the cheapest model that meets an agreement floor",
        "",
        f"`python benchmarks/guard_plan.py` runs `guardmerge plan` on the five guard experts: floor "
        f"{s['min_agreement']} on every head's agreement with its expert (own-task and off-task texts, first "
        f"{s['val_limit']} validation texts a task), compute at most {s['max_compute']}x one pass, "
        f"{s['trials']} plans (method {s['methods'] or s['trunk']['method']}, per-task depth L, L-1, L-2, heal "
        f"{s['heal']}; heal settings "
        + ", ".join(f"{k}={v}" for k, v in (s.get("heal_settings") or {}).items())
        + "). Every scored plan, cheapest first (`*` chosen, `p` on the Pareto front):",
        "",
        "| | compute | min agreement (validation) | meets floor | plan |",
        "|---|---|---|---|---|",
    ]
    for r in p["frontier"]:
        mark = ("*" if r["trial"] == chosen["trial"] else "") + ("p" if r["pareto"] else "")
        plan_params = r["plan"]
        depths = ", ".join(f"{k.removeprefix('depth.')}={v}" for k, v in plan_params.items() if k.startswith("depth."))
        lines.append(
            f"| {mark} | {fmt(r['compute'], 3)}x | {fmt(r['min_agreement'])} | {'yes' if r['feasible'] else 'no'} | "
            f"{plan_params['method']}, heal {plan_params['heal']}, depths {depths} |"
        )
    lines += [
        "",
        f"The chosen model on test ({'meets' if plan['meets_floor_on_test'] else 'misses'} the floor; the plan's "
        f"last process ran {plan['seconds'] / 60:.0f} min on this machine, {fmt_produced(plan)}"
        + (f"; {plan['produced']['note']}" if plan["produced"].get("note") else "")
        + "):",
        "",
    ]
    row = {**test, "compute_vs_one_pass": chosen["compute"], "produced": plan["produced"]}
    intro = "Each head against its expert on the test texts (own task / off-task)."
    return [*lines, *agreement_table("", intro, [("chosen plan", row)], tasks, "")[2:]]
