"""BENCHMARKS.md sections from the other benchmarks' results files, each when its file exists:
merge speed and memory vs mergekit (benchmarks/merge_speed.py), cold start (benchmarks/load_time.py), versus LLM Guard
(benchmarks/vs_llm_guard.py) and reliability (benchmarks/reliability.py). Called by
benchmarks/report.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from report_common import fmt, fmt_produced


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
            f"; start-up alone (a process importing guardmerge's CLI and torch) {fmt(res['startup_s'], 2)} s."
            if "startup_s" in res
            else "."
        ),
        "",
        "Checks off: the same merge with its NaN/Inf checks switched off (benchmarks/unchecked_merge.py, "
        "benchmark only); checks cost = (guardmerge - checks off) / guardmerge. A row without a commit predates "
        "the benchmark's recording of one.",
        "",
        "| job | runs | guardmerge s | checks off s | checks cost | mergekit s | speedup | guardmerge peak MiB | "
        "mergekit peak MiB | I/O floor s | guardmerge / floor | max abs diff | entries differing | produced |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, j in res.get("jobs", {}).items():
        runs = len(j.get("guardmerge_runs_s", [])) or res.get("runs", "?")
        lines.append(
            f"| {name} | {runs} | {fmt(j['guardmerge_s'], 1)} | {fmt(j.get('guardmerge_unchecked_s'), 1)} | "
            f"{fmt(j.get('checks_cost_fraction'), 3)} | {fmt(j['mergekit_s'], 1)} | {fmt(j['speedup'], 2)}x | "
            f"{fmt(j['guardmerge_peak_mb'], 0)} | {fmt(j['mergekit_peak_mb'], 0)} | {fmt(j['floor_s'], 2)} | "
            f"{fmt(j['guardmerge_over_floor'], 1)}x | {j['max_abs_diff_vs_mergekit']:.2g} | "
            f"{j.get('fraction_differing_vs_mergekit', float('nan')):.2g} | {fmt_produced(j)} |"
        )
    return [*lines, ""]


def load_time_table(path: Path) -> list[str]:
    """Cold process to first answer (benchmarks/load_time.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    lines = [
        "## Cold start to first answer (`python benchmarks/load_time.py`)",
        "",
        f"Median of {res.get('runs', '?')} fresh processes per scenario on `{Path(res['model']['folder']).name}` "
        "(page cache warm); phases are measured inside the process (imports of the entry module, load, first "
        "answer; the rest is interpreter start and exit).",
        "",
        "| scenario | wall s | import s | load s | first answer s | imports torch | imports transformers | goal s "
        "| produced |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.get("scenarios", {}).items():
        lines.append(
            f"| {name} | {fmt(r['wall_s'], 3)} | {fmt(r.get('import_s'), 3)} | {fmt(r.get('load_s'), 3)} | "
            f"{fmt(r.get('answer_s'), 3)} | {r.get('torch', '-')} | {r.get('transformers', '-')} | "
            f"{fmt(r.get('goal_s'), 1)} | {fmt_produced(r)} |"
        )
    return [*lines, ""]


def vs_llm_guard_table(path: Path) -> list[str]:
    """guardmerge's LLM Guard scanners vs LLM Guard 0.3.16's own (benchmarks/vs_llm_guard.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    tasks = [
        t for t in ("injection", "hate", "offensive", "emotion", "irony") if t in res.get("llm_guard_scanners", {})
    ]
    lines = [
        *_vs_llm_guard_text(res),
        "| tool | mode | p50 ms (1 prompt) | p95 ms | batch-32 texts/s | import s | load s | peak RSS MiB | "
        "disk MiB | mean macro-F1 | " + " | ".join(tasks) + " | produced |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for tool in ("llm_guard", "guardmerge"):
        for mode, r in res.get(tool, {}).items():
            lines.append(
                f"| {tool.replace('_', ' ')} | {mode} | {fmt(r['single']['p50_ms'], 1)} | "
                f"{fmt(r['single']['p95_ms'], 1)} | "
                f"{fmt(r['batch32']['texts_per_s'], 1)} | {fmt(r.get('import_s'), 2)} | {fmt(r.get('load_s'), 2)} | "
                f"{fmt(r.get('peak_rss_mb'), 0)} | {fmt(r.get('disk_mb'), 0)} | {fmt(r.get('mean_macro_f1'))} | "
                + " | ".join(fmt(r.get("macro_f1", {}).get(t)) for t in tasks)
                + f" | {fmt_produced(r)} |"
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
            f"| {run.replace('_', ' ')} | " + " | ".join(fmt(a.get(t)) for t in tasks) + " |"
            for run, a in agree.items()
        ]
    return [*lines, *_integration_check(res.get("integration_check", {})), ""]


def _vs_llm_guard_text(res: dict) -> list[str]:
    """The section's title, how the two tools were run, and the headline ratios against the goals."""
    st, head, goals = res.get("settings", {}), res.get("headline", {}), res.get("goals", {})
    merged = res.get("merged", {})
    scanners = ", ".join(f"{t}: `{s['kind']}`" for t, s in res.get("llm_guard_scanners", {}).items())
    single, batch = head.get("single_prompt", {}), head.get("batch32", {})
    met = lambda key: "met" if goals.get(key) else "not met"  # noqa: E731
    env = res.get("environment", {})
    return [
        f"## Versus LLM Guard {st.get('llm_guard', '')} (`python benchmarks/vs_llm_guard.py`)",
        "",
        f"The five guard experts behind LLM Guard's own classifier scanners ({scanners}; each a custom "
        "`Model(path=...)`, re-exported with the label names the scanner reads), run with `scan_prompt`, against "
        f"the merged five-head model (`{merged.get('row', '?')}`) behind `guardmerge.integrations.llm_guard` "
        f"scanners. Same {st.get('texts', '?')} guard test texts ({st.get('texts_per_task') or 'all'} a task), "
        f"threshold {st.get('threshold', '?')} on every scanner, at most {st.get('max_length', '?')} tokens; each "
        f"tool and mode in a fresh process, inference threads: {st.get('threads') or 'the runtime default'} "
        f"(load average {', '.join(f'{x:.1f}' for x in env.get('load_average', [])) or '?'}); "
        f"produced {fmt_produced(res)}. LLM Guard has no batch API: its batch-32 figure is 32 `scan_prompt` calls; "
        "guardmerge's runs each batch in batched passes (`prefetch`, prompts of similar length together), the "
        "texts in a fixed shuffled order. LLM Guard's "
        "ONNX mode (`use_onnx=True`, "
        f"optimum): {res.get('llm_guard_onnx', '?')}.",
        "",
        f"One prompt at a time, guardmerge ({single.get('guardmerge', '?')}) answers all five scanners "
        f"**{fmt(res.get('single_prompt_speedup'), 1)}x** faster than LLM Guard ({single.get('llm_guard', '?')}) "
        f"(p50; goal 5x: {met('single_prompt_speedup_5x')}); for batches of 32, "
        f"**{fmt(res.get('batch32_speedup'), 1)}x** the throughput ({batch.get('guardmerge', '?')} vs "
        f"{batch.get('llm_guard', '?')}; goal 10x: {met('batch32_speedup_10x')}). Peak RSS "
        f"{fmt(head.get('peak_rss_ratio'), 2)} and disk {fmt(head.get('disk_ratio'), 2)} of LLM Guard's, each "
        f"tool's smallest mode against the other's (goal at most 1/3: memory {met('peak_rss_at_most_one_third')}, "
        f"disk {met('disk_at_most_one_third')}).",
        "",
    ]


def _integration_check(check: dict) -> list[str]:
    """The README example run through LLM Guard's ``scan_prompt`` (none when it was not run)."""
    if not check:
        return []
    if "error" in check:
        return ["", f"Integration check (in the llm-guard environment) failed: {check['error'][-300:]}"]
    versions = ", ".join(f"{k} {v}" for k, v in check.get("versions", {}).items())
    return [
        "",
        f"Integration check ({versions}): the README example, guardmerge's scanners through the real "
        f"`scan_prompt` on {check.get('texts', '?')} texts (result keys "
        f"{', '.join(check.get('scan_prompt_keys', []))}): "
        f"{check.get('scan_prompt_vs_direct_mismatches', '?')} verdicts differ from the same scanners called "
        f"directly, {check.get('scan_prompt_vs_guardmerge_torch_run_mismatches', '?')} from the guardmerge "
        f"PyTorch run; risk scores differ from LLM Guard's `calculate_risk_score` at "
        f"{check.get('risk_score_mismatches_vs_llm_guard', '?')} of {check.get('risk_score_grid_points', '?')} "
        "grid points.",
    ]


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
        f"Measured at commit {fmt_produced(rel)}, {env.get('cpus', '?')} CPUs, torch {env.get('torch', '?')}.",
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
        f"Fault tests: {_counts(rel['faults'])} in {rel['faults']['seconds']} s.",
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
        f"Every reader against every broken folder (`tests/io/test_readers.py`): {_counts(rel['readers'])}.",
        "",
    ]
    soak = rel.get("soak")
    if soak:
        s_env = soak.get("environment", {})
        lines += [
            f"**Soak** (`benchmarks/soak.py`, commit {fmt_produced(soak)}, load average at the start "
            f"{', '.join(f'{x:.2f}' for x in s_env.get('load_average', []))}): "
            f"{soak['settings']['requests']} requests from {soak['settings']['clients']} clients, "
            "78% normal, the rest malformed, unauthenticated, oversized, slow or stalled bodies, then unknown "
            "head names.",
            "",
            "| backend | requests | normal requests | errors on normal | unexpected statuses "
            "| normal p50 / p95 / p99 ms | RSS after warm-up -> end (MB) | /healthz at end |",
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


def _counts(run: dict[str, object]) -> str:
    """A test run's outcome counts as words (``10 passed``), and whether the run failed."""
    tests = run.get("tests")
    words = ", ".join(f"{n} {what}" for what, n in (tests if isinstance(tests, dict) else {}).items())
    words = words or "no counts recorded"
    return words if run.get("ok") else f"{words} (the run FAILED)"


def serve_table(path: Path) -> list[str]:
    """Bounded HTTP load on ``guardmerge serve`` (benchmarks/serve_load.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    s = res.get("settings", {})
    lines = [
        "## Serving under load (`python benchmarks/serve_load.py`)",
        "",
        f"`{res.get('model')}` ({', '.join(res.get('tasks', []))}): {s.get('requests')} requests of one test-set "
        f"text each, {s.get('concurrency')} concurrent clients on loopback, server threads {s.get('threads')}, "
        f"micro-batches of at most {s.get('max_batch')} texts / {s.get('max_wait_ms')} ms; the client shares the "
        "CPUs with the server. Offline: the backend alone at a fixed batch (the ceiling of micro-batching).",
        "",
    ]
    return [*lines, *serve_rows(res), ""]


def serve_rows(res: dict) -> list[str]:
    """serve.json's table: one row per backend (BENCHMARKS.md and the README's serving block)."""
    lines = [
        "| backend | requests/s | p50 ms | p95 ms | p99 ms | errors | mean micro-batch | offline texts/s | produced |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, r in res.get("results", {}).items():
        lat = r["latency_ms"]
        lines.append(
            f"| {backend} | {fmt(r['requests_per_s'], 1)} | {fmt(lat['p50'], 0)} | {fmt(lat['p95'], 0)} | "
            f"{fmt(lat['p99'], 0)} | {r['errors']} | {fmt(r.get('mean_batch_size'), 1)} | "
            f"{fmt(r.get('offline_batch_texts_per_s'), 1)} | {fmt_produced(r)} |"
        )
    return lines


def ray_serve_table(path: Path) -> list[str]:
    """The single-process server against Ray Serve replicas (benchmarks/ray_serve_load.py), if it was run."""
    if not path.is_file():
        return []
    res = json.loads(path.read_text())
    s = res.get("settings", {})
    lines = [
        "## Ray Serve replicas vs one process (`python benchmarks/ray_serve_load.py`)",
        "",
        f"`{res.get('model')}`: {s.get('requests')} requests of one text, {s.get('concurrency')} concurrent "
        f"clients on loopback, {s.get('threads')} inference thread(s) per process or replica, all on the same "
        f"{res.get('environment', {}).get('cpus', '?')} CPUs as the client: replicas compete for them, so this "
        "shows what Ray Serve's proxy and batching cost on one machine, not what a cluster gains.",
        "",
        "| set-up | replicas | requests/s | vs single | p50 ms | p95 ms | errors | produced |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.get("results", {}).items():
        lat = r["latency_ms"]
        lines.append(
            f"| {name} | {r.get('replicas') or '-'} | {fmt(r['requests_per_s'], 1)} | "
            f"{fmt(r.get('throughput_vs_single'), 2)}x | {fmt(lat['p50'], 0)} | {fmt(lat['p95'], 0)} | "
            f"{r['errors']} | {fmt_produced(r)} |"
        )
    return [*lines, ""]
