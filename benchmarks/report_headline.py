"""The README's benchmark headline, generated from benchmarks/results/guard.json (never by hand).

Written between the README's ``<!-- headline:start -->`` and ``<!-- headline:end -->`` markers
by benchmarks/report.py, beside BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from report_common import fmt, fmt_produced, replace_block


def _iv(r: Mapping[str, Any], name: str = "normalised") -> str:
    iv = r.get("intervals") or {}
    if iv.get(f"{name}_low") is None:
        return ""
    return f" [95% {fmt(iv[f'{name}_low'])}-{fmt(iv[f'{name}_high'])}]"


def _agreements(r: Mapping[str, Any]) -> str:
    own = {t: v for t, v in (r.get("agreement") or {}).items() if v is not None}
    off = {t: v for t, v in (r.get("off_task_agreement") or {}).items() if v is not None}
    if not own:
        return ""
    low = min(own, key=own.__getitem__)
    return (
        f"heads agree with their experts on {fmt(min(own.values()))}-{fmt(max(own.values()))} of their own test "
        f"texts (lowest: {low}) and {fmt(min(off.values(), default=None))}-{fmt(max(off.values(), default=None))} "
        "of the other tasks'"
    )


def _best_training_free(res: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    rows = {k: m for k, m in res.get("methods", {}).items() if "validation_mean_macro_f1" in m}
    if not rows:
        return None
    name = max(rows, key=lambda k: rows[k]["validation_mean_macro_f1"])
    return name, rows[name]


def headline(res: Mapping[str, Any]) -> list[str]:
    """Bullets: speed, the best training-free row and its fidelity, heal, sharing depth, seven tasks."""
    lines: list[str] = []
    sp = res.get("speed")
    if sp:
        b32, b1 = sp["batch32"], sp["batch1"]
        lines.append(
            f"- One merged five-head model answers all five guards **{b32['ratio']:.1f}x faster** than the five "
            f"experts run one after another (batch 32: {fmt(b32['merged_texts_per_s'], 1)} vs "
            f"{fmt(b32['experts_texts_per_s'], 1)} texts/s; batch 1 p50: {fmt(b1['merged_p50_ms'], 0)} vs "
            f"{fmt(b1['experts_p50_ms'], 0)} ms; {fmt_produced(sp)})."
        )
    best = _best_training_free(res)
    if best:
        name, m = best
        lines.append(
            f"- **Training-free**, the best single-pass merge chosen on validation is **`{name}`**: "
            f"{fmt(m['normalized'])} normalised macro-F1{_iv(m)}, worst task {m.get('worst_task')} at "
            f"{fmt(m.get('worst_task_ratio'))}, mean macro-F1 {fmt(m['mean_macro_f1'])} vs the experts' "
            f"{fmt(res.get('experts_mean_macro_f1'))}; {_agreements(m)} ({fmt_produced(m)})."
        )
    heal = (res.get("heal") or {}).get("rows") or {}
    if heal:
        name = max(heal, key=lambda k: (heal[k].get("compute_vs_one_pass", 1.0) <= 1.0, heal[k]["min_agreement"]))
        r = heal[name]
        h = r.get("heal", {})
        lines.append(
            f"- **Heal** (label-free distillation from the experts, the one step that trains): **`{name}`** keeps "
            f"{fmt(r['normalized'])} normalised{_iv(r)}, worst task {fmt(r.get('worst_task_ratio'))}, mean "
            f"macro-F1 {fmt(r['mean_macro_f1'])}; {_agreements(r)}; lowest agreement {fmt(r['min_agreement'])} "
            f"against the 0.97 goal; heal took {fmt(h.get('seconds'), 0)} s on {h.get('pool', {}).get('texts', '?')} "
            f"pooled texts{_cached_teachers(heal, h)} ({fmt_produced(r)})."
        )
    fr = res.get("frontier") or {}
    deeper = {k: r for k, r in fr.get("rows", {}).items() if k.startswith("K=") and r["compute_vs_one_pass"] > 1}
    if deeper:
        k = min(deeper, key=lambda n: deeper[n]["compute_vs_one_pass"])
        r = deeper[k]
        lines.append(
            f"- **Sharing depth** on the `{fr['trunk']}` trunk: each task's own top blocks from {k} "
            f"({fmt(r['compute_vs_one_pass'], 2)}x the compute of one pass) keep {fmt(r['normalized'])} normalised "
            f"(worst task {fmt(r.get('worst_task_ratio'))}); lowest agreement {fmt(r.get('min_agreement'))} "
            f"({fmt_produced(r)})."
        )
    sev = res.get("seven_task") or {}
    if sev.get("rows"):
        rows = sev["rows"]
        name = max(rows, key=lambda k: rows[k].get("validation_mean_macro_f1", -1.0))
        r = rows[name]
        ner = (r.get("official") or {}).get("ner", {})
        healed = {k: v for k, v in rows.items() if "heal" in v}
        text = (
            f"- **Seven tasks** (plus multi-label GoEmotions and token-level NER, one seven-head model): "
            f"`{name}` keeps {fmt(r['normalized'])} normalised, NER entity F1 at {fmt(ner.get('normalized'))} of "
            f"its expert's, lowest agreement {fmt(r.get('min_agreement'))}"
        )
        for hk, hv in healed.items():
            hner = (hv.get("official") or {}).get("ner", {})
            text += (
                f"; `{hk}`: {fmt(hv['normalized'])}, NER {fmt(hner.get('normalized'))}, lowest agreement "
                f"{fmt(hv.get('min_agreement'))}"
            )
        lines.append(text + f" ({fmt_produced(r)}).")
    return lines


def write_headline(res: Mapping[str, Any], readme: Path) -> None:
    """Replace the README's headline block (:func:`~report_common.replace_block`)."""
    readme.write_text(replace_block(readme.read_text(), "headline", headline(res)))


def _cached_teachers(rows: Mapping[str, Any], h: Mapping[str, Any]) -> str:
    """``, teachers cached ...`` when the row's teachers came from an earlier row's cache: the
    heal's seconds then leave out the experts' pass, which the first row of the same pool paid."""
    if not any((h.get("teachers_cached") or {}).values()):
        return ""
    paid = [
        r["heal"]["teacher_seconds"]
        for r in rows.values()
        if r.get("heal", {}).get("pool", {}).get("texts") == h.get("pool", {}).get("texts")
        and not any((r["heal"].get("teachers_cached") or {}).values())
    ]
    return f" (the experts' outputs cached by an earlier row: add their {fmt(paid[0], 0)} s uncached)" if paid else ""
