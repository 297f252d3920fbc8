"""The README's measured paragraphs and tables, from benchmarks/results/*.json (never typed by hand).

Each block sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in README.md and is
rewritten by :func:`write_readme_blocks` (called by benchmarks/report.py): ``merge-speed``
(merge_speed.json, load_time.json), ``llm-guard-table`` (vs_llm_guard.json), ``serve-table``
(serve.json) and ``onnx-accuracy`` (onnx_accuracy.json). A block whose results file is missing
is left as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from report_common import fmt, fmt_produced, replace_block
from report_other import serve_rows


def _read(results: Path, name: str) -> dict[str, Any] | None:
    """``results/name`` parsed, or None when that benchmark was not run."""
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def _commit(r: Mapping[str, Any]) -> str:
    return str((r.get("produced") or {}).get("commit", "?"))


def merge_speed_block(results: Path) -> list[str] | None:
    """Merging itself (merge_speed.json) and cold start (load_time.json)."""
    res = _read(results, "merge_speed.json")
    if res is None:
        return None
    jobs = res["jobs"]
    ties, llama = jobs.get("bert_base_x4_ties"), jobs.get("llama_1b_x3_ties")
    ta, dare = jobs.get("bert_base_x4_task_arithmetic"), jobs.get("bert_base_x4_dare_ties")
    commits = sorted({_commit(j) for j in jobs.values()})
    costs = {k: j["checks_cost_fraction"] for k, j in jobs.items() if j.get("checks_cost_fraction") is not None}
    lines = [
        "Merging itself (`python benchmarks/merge_speed.py`, guardmerge with its `fast` extra vs mergekit",
        "0.1.5 on identical jobs, alternating fresh processes, start-up included, input and output checks",
        f"on; table in BENCHMARKS.md; every job run at {', '.join(commits)}):",
    ]
    parts = []
    if ties:
        parts.append(
            f"**TIES over four BERT-base checkpoints {fmt(ties['speedup'], 1)}x faster than mergekit "
            f"({fmt(ties['guardmerge_s'], 1)} vs {fmt(ties['mergekit_s'], 1)} s)** at "
            f"{100 * ties['guardmerge_peak_mb'] / ties['mergekit_peak_mb']:.0f}% of its peak memory"
        )
    if llama:
        runs = len(llama.get("guardmerge_runs_s", []))
        parts.append(
            f"TIES over three 1.1B bf16 Llama checkpoints {fmt(llama['speedup'], 1)}x ({fmt(llama['guardmerge_s'], 1)} "
            f"vs {fmt(llama['mergekit_s'], 1)} s, {runs} run{'s' if runs != 1 else ''}; "
            f"{fmt(llama['guardmerge_over_floor'], 1)}x its I/O floor)"
        )
    for name, j in (("task arithmetic", ta), ("DARE-TIES", dare)):
        if j:
            parts.append(f"{name} {fmt(j['speedup'], 2)}x ({fmt(j['guardmerge_s'], 1)} vs {fmt(j['mergekit_s'], 1)} s)")
    text = "; ".join(parts) + "."
    if costs:
        most = max(costs, key=lambda name: costs[name])
        text += (
            f" The checks (reads, writer and the writer's output probe) cost {100 * min(costs.values()):.0f}% to "
            f"{100 * costs[most]:.0f}% of merge time (most: {most}), measured against the same merges with them "
            "switched off (benchmark only)."
        )
    if "startup_s" in res:
        text += (
            f" A process that only imports guardmerge's CLI and torch takes {fmt(res['startup_s'], 2)} s (`startup_s`)."
        )
    lines.append(text)
    load = _read(results, "load_time.json")
    sc = (load or {}).get("scenarios", {})
    bits = []
    if "help" in sc:
        bits.append(f"`guardmerge --help` answers in {fmt(sc['help']['wall_s'], 2)} s")
    if "load_predict_torch" in sc:
        lp = sc["load_predict_torch"]
        bits.append(
            f"a cold `load()` + predict of the five-head MiniLM model takes {fmt(lp['wall_s'], 2)} s "
            f"({fmt(lp.get('load_s'), 2)} s in `load()`, torch and transformers imported there)"
        )
    if "scanner_onnx" in sc:
        bits.append(f"the ONNX LLM Guard scanner answers first after {fmt(sc['scanner_onnx']['wall_s'], 2)} s")
    if bits:
        commit = sorted({_commit(s) for s in sc.values() if isinstance(s, dict)})
        text = ", ".join(bits)
        lines.append(
            f"{text[0].upper()}{text[1:]} (`python benchmarks/load_time.py`, {', '.join(commit)}; "
            "table in BENCHMARKS.md)."
        )
    return lines


def llm_guard_block(results: Path) -> list[str] | None:
    """The README's LLM Guard comparison table (vs_llm_guard.json)."""
    res = _read(results, "vs_llm_guard.json")
    if res is None:
        return None
    st, head = res.get("settings", {}), res.get("headline", {})
    lines = [
        f"Measured against LLM Guard {st.get('llm_guard', '')} on the five guard experts, {st.get('texts', '?')} guard "
        f"test texts, {'one inference thread' if st.get('threads') == 1 else 'the runtime default threads'}, each "
        f"tool and mode in a fresh process, {fmt_produced(res)} (`python benchmarks/vs_llm_guard.py`; full table, "
        'macro-F1 per task and verdict agreement per scanner in [BENCHMARKS.md](BENCHMARKS.md), "Versus '
        'LLM Guard"):',
        "",
        "| | p50 ms, one prompt | texts/s, batches of 32 | peak RSS MiB | disk MiB | mean macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        ("llm_guard", "torch"): "LLM Guard, PyTorch",
        ("llm_guard", "onnx"): "LLM Guard, ONNX (`use_onnx=True`)",
        ("guardmerge", "torch"): "guardmerge, PyTorch",
        ("guardmerge", "onnx"): "guardmerge, ONNX fp32",
        ("guardmerge", "int8"): "guardmerge, ONNX int8",
    }
    best = (head.get("single_prompt") or {}).get("guardmerge")
    for (tool, mode), label in names.items():
        r = res.get(tool, {}).get(mode)
        if r is None:
            continue
        cells = [
            fmt(r["single"]["p50_ms"], 1),
            fmt(r["batch32"]["texts_per_s"], 1),
            fmt(r.get("peak_rss_mb"), 0),
            fmt(r.get("disk_mb"), 0),
        ]
        if tool == "guardmerge" and mode == best:
            ratios = [
                f"{fmt(res.get('single_prompt_speedup'), 1)}x",
                f"{fmt(res.get('batch32_speedup'), 1)}x",
                f"{fmt(head.get('peak_rss_ratio'), 2)}x",
                f"{fmt(head.get('disk_ratio'), 2)}x",
            ]
            cells = [f"**{c}** ({q})" for c, q in zip(cells, ratios, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(r.get('mean_macro_f1'))} |")
    agree = (res.get("agreement_with_llm_guard_torch") or {}).get("guardmerge torch", {})
    if agree:
        order = sorted(agree, key=lambda t: -agree[t])
        lines += [
            "",
            "The ONNX modes import neither torch nor transformers (the tokenizer is read from `tokenizer.json`",
            "with `tokenizers`), which is most of the memory difference. The merged model's verdicts agree with",
            "LLM Guard's on the experts for "
            + ", ".join(f"{fmt(agree[t], 2)} ({t})" for t in order[:-1])
            + f" and {fmt(agree[order[-1]], 2)} ({order[-1]}) of the texts{_integration(res)}",
        ]
    return lines


def _integration(res: Mapping[str, Any]) -> str:
    """How the README example fared through LLM Guard's real ``scan_prompt`` in the same run."""
    check = res.get("integration_check") or {}
    if not check:
        return "."
    if "error" in check:
        return (
            ". The check of the README code through LLM Guard's real `scan_prompt` (in LLM Guard's own "
            "environment) failed in this run; BENCHMARKS.md shows the error."
        )
    return (
        ": through LLM Guard's real `scan_prompt`, the README code gives "
        f"{check.get('scan_prompt_vs_direct_mismatches')} verdicts that differ from the scanners called directly."
    )


def serve_block(results: Path) -> list[str] | None:
    """The README's serving table (serve.json)."""
    res = _read(results, "serve.json")
    if res is None:
        return None
    s = res.get("settings", {})
    return [
        f"**Measured** (`benchmarks/`, on the demo's three-head MiniLM model, 2 CPU cores shared by the server and the "
        f"load client; {fmt_produced(res)}).",
        f"`python benchmarks/serve_load.py guardmerge-demo/merged --threads {s.get('threads')}` "
        f"({s.get('requests'):,} requests of one guard test-set text each, {s.get('concurrency')} concurrent clients, "
        "loopback, server in a subprocess):",
        "",
        *serve_rows(res),
    ]


def onnx_accuracy_block(results: Path) -> list[str] | None:
    """The README's ONNX parity paragraph (onnx_accuracy.json)."""
    r = _read(results, "onnx_accuracy.json")
    if r is None:
        return None
    tasks = r.get("tasks", {})
    agree = [a for h in r.get("heads", {}).values() for a in [h.get("argmax_agreement_int8")] if a is not None]
    speed = r.get("texts_per_s", {})
    size = r.get("model_bytes", {})
    st = r.get("settings", {})
    return [
        f"`python benchmarks/onnx_accuracy.py guardmerge-demo/merged --threads {st.get('threads')}` (all "
        f"{r.get('texts'):,} test texts of {', '.join(tasks)}; every head on every text; max length "
        f"{st.get('max_length')}; {fmt_produced(r)}): fp32 ONNX max |logit - PyTorch logit| = "
        f"{r['fp32_max_abs_diff']:.1e} (goal 1e-4). int8: max |diff| {fmt(r['int8_max_abs_diff'], 2)} logits "
        "(stated tolerance: 1.5)"
        + (f", {100 * min(agree):.0f}-{100 * max(agree):.0f}% argmax agreement with PyTorch" if agree else "")
        + ", macro-F1 change "
        + ", ".join(f"{t} {v['macro_f1_change_int8']:+.3f}" for t, v in tasks.items())
        + f"; {size.get('int8', 0) / 1e6:.0f} MB instead of {size.get('fp32', 0) / 1e6:.0f} MB and "
        f"{speed.get('onnx_int8', 0) / max(speed.get('onnx_fp32', 1), 1e-9):.1f}x the fp32 texts/s. Results:",
        "`benchmarks/results/serve.json`, `benchmarks/results/onnx_accuracy.json`.",
    ]


BLOCKS: dict[str, Callable[[Path], list[str] | None]] = {
    "merge-speed": merge_speed_block,
    "llm-guard-table": llm_guard_block,
    "serve-table": serve_block,
    "onnx-accuracy": onnx_accuracy_block,
}


def write_readme_blocks(readme: Path, results: Path) -> None:
    """Rewrite every block of :data:`BLOCKS` whose results file exists."""
    text = readme.read_text()
    for name, build in BLOCKS.items():
        lines = build(results)
        if lines is not None:
            text = replace_block(text, name, lines)
    readme.write_text(text)
