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

from report_common import fmt, fmt_produced


def _commit(r: Mapping[str, Any]) -> str:
    return str((r.get("produced") or {}).get("commit", "?"))


def merge_speed_block(results: Path) -> list[str] | None:
    """Merging itself (merge_speed.json) and cold start (load_time.json)."""
    path = results / "merge_speed.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    jobs = res["jobs"]
    ties, llama = jobs.get("bert_base_x4_ties"), jobs.get("llama_1b_x3_ties")
    ta, dare = jobs.get("bert_base_x4_task_arithmetic"), jobs.get("bert_base_x4_dare_ties")
    commits = sorted({_commit(j) for j in jobs.values()})
    costs = [j["checks_cost_fraction"] for j in jobs.values() if j.get("checks_cost_fraction") is not None]
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
        text += (
            f" The same merges with the checks switched off (benchmark only: reads, writer and the writer's "
            f"output probe) differ by {100 * min(costs):+.0f}% to {100 * max(costs):+.0f}%"
        )
        if dare and dare.get("checks_cost_fraction") is not None:
            text += (
                f" (DARE-TIES: {100 * dare['checks_cost_fraction']:+.0f}%, the output probe that loads a model "
                "whose weights left the inputs' range, as DARE's rescaling makes them)"
            )
        text += "."
    if "startup_s" in res:
        text += (
            f" A process that only imports guardmerge's CLI and torch takes {fmt(res['startup_s'], 2)} s (`startup_s`)."
        )
    lines.append(text)
    load = results / "load_time.json"
    if load.is_file():
        sc = json.loads(load.read_text()).get("scenarios", {})
        bits = []
        if "help" in sc:
            bits.append(f"`guardmerge --help` answers in {fmt(sc['help']['wall_s'], 2)} s")
        if "load_predict_torch" in sc:
            bits.append(
                f"a cold `load()` + predict of the five-head MiniLM model takes "
                f"{fmt(sc['load_predict_torch']['wall_s'], 2)} s (importing torch and transformers is most of it)"
            )
        if "scanner_onnx" in sc:
            bits.append(f"the ONNX LLM Guard scanner answers first after {fmt(sc['scanner_onnx']['wall_s'], 2)} s")
        if bits:
            commit = sorted({_commit(s) for s in sc.values() if isinstance(s, dict)})
            lines.append(
                ", ".join(bits)[0].upper()
                + ", ".join(bits)[1:]
                + f" (`python benchmarks/load_time.py`, {', '.join(commit)}; table in BENCHMARKS.md)."
            )
    return lines


def llm_guard_block(results: Path) -> list[str] | None:
    """The README's LLM Guard comparison table (vs_llm_guard.json)."""
    path = results / "vs_llm_guard.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
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
            + f" and {fmt(agree[order[-1]], 2)} ({order[-1]}) of the texts: the gap is the merge's quality gap, not "
            "the integration's (the README code through the real `scan_prompt` gives exactly the verdicts of the "
            "scanners called directly).",
        ]
    return lines


def serve_block(results: Path) -> list[str] | None:
    """The README's serving table (serve.json)."""
    path = results / "serve.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    s = res.get("settings", {})
    lines = [
        f"**Measured** (`benchmarks/`, on the demo's three-head MiniLM model, 2 CPU cores shared by the server and the "
        f"load client; {fmt_produced(res)}).",
        f"`python benchmarks/serve_load.py guardmerge-demo/merged --threads {s.get('threads')}` "
        f"({s.get('requests'):,} requests of one guard test-set text each, {s.get('concurrency')} concurrent clients, "
        "loopback, server in a subprocess):",
        "",
        "| backend | requests/s | p50 ms | p95 ms | errors | mean micro-batch | offline batch-32 texts/s |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"torch": "torch", "onnx": "onnx (fp32)"}
    for backend, r in res.get("results", {}).items():
        lat = r["latency_ms"]
        lines.append(
            f"| {labels.get(backend, backend)} | {fmt(r['requests_per_s'], 1)} | {fmt(lat['p50'], 0)} | "
            f"{fmt(lat['p95'], 0)} | {r['errors']} | {fmt(r.get('mean_batch_size'), 2)} | "
            f"{fmt(r.get('offline_batch_texts_per_s'), 1)} |"
        )
    return lines


def onnx_accuracy_block(results: Path) -> list[str] | None:
    """The README's ONNX parity paragraph (onnx_accuracy.json)."""
    path = results / "onnx_accuracy.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
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


def replace_block(text: str, name: str, lines: list[str]) -> str:
    """``text`` with the block ``name`` replaced by ``lines`` (unchanged when its markers are absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}"


def write_readme_blocks(readme: Path, results: Path) -> list[str]:
    """Rewrite every block of :data:`BLOCKS` whose results file exists; the names rewritten."""
    text = readme.read_text()
    done = []
    for name, build in BLOCKS.items():
        lines = build(results)
        if lines is not None:
            new = replace_block(text, name, lines)
            if new != text or f"<!-- {name}:start -->" in text:
                done.append(name)
            text = new
    readme.write_text(text)
    return done
