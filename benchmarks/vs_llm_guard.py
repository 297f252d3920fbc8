"""guardmerge vs LLM Guard 0.3.16: one run, both tools, the same five experts, the same texts.

    python benchmarks/vs_llm_guard.py                    # 200 test texts a task, 1,000 in all
    python benchmarks/vs_llm_guard.py --texts 0 --threads 2
    python benchmarks/vs_llm_guard.py --smoke            # 4 texts a task (or --texts); WORK/vs_llm_guard/smoke.json

Set-up (everything cached under WORK, default benchmarks/.work):

- LLM Guard pins transformers 4.51.3, so it lives in an environment of its own,
  WORK/llm_guard_venv, created when missing with ``python -m venv`` and
  ``pip install torch==2.13.0 'llm-guard[onnxruntime]==0.3.16'`` (the extra brings optimum, for
  LLM Guard's ``use_onnx=True``; when it does not install, llm-guard alone is installed and the
  results say the ONNX mode is missing). It is never a guardmerge dependency.
- Experts: the five guard experts of benchmarks/zoo.py (cached in WORK/zoo). On the LLM Guard
  side each one sits behind the classifier scanner whose rule fits it, given as a custom
  ``Model(path=...)``, re-exported (weights copied, ``id2label`` renamed) with the label names that
  scanner reads (:data:`LLM_GUARD_SCANNERS`): injection -> ``PromptInjection`` (SAFE/INJECTION),
  hate -> ``Toxicity`` (non_toxic/toxicity), offensive -> ``Toxicity`` (non_toxic/insult), irony ->
  ``Gibberish`` (clean/word salad), emotion -> ``Language`` with its labels as they are and
  ``valid_languages=["anger"]`` (flags any other label above the threshold). Each scanner is a
  subclass named after its task, since ``scan_prompt`` keys results by class name.
- guardmerge side: the merged five-head model of the guard benchmark's best single-pass row
  (the quality row of benchmarks/results/guard.json with the best validation score, built the way
  benchmarks/guard.py builds it; ``--row`` picks another row), saved once, then exported to ONNX
  fp32 and int8. Its scanners are ``guardmerge.integrations.llm_guard.scanners``.
- LLM Guard's ONNX mode loads each expert exported once with optimum (WORK/vs_llm_guard/
  llm_guard_onnx), given as ``Model(path=..., onnx_path=...)``; optimum 1.25.2 exports with torch's
  TorchScript exporter (``dynamo=False``), as it did before torch made the dynamo exporter default.

Both sides flag a head when a label other than its first reaches the threshold (``--threshold``,
0.5); LLM Guard compares strictly (``>``, after rounding to 2 decimals in PromptInjection and
Gibberish), guardmerge at or above. Both truncate at ``--max-length`` tokens (512) and pad no
further than the prompt.

Measured, each side and mode in a fresh process (benchmarks/vs_llm_guard_worker.py), on the same
texts (the first ``--texts`` test texts of each task): per-prompt latency p50/p95 with one prompt
at a time (the whole scanner list per prompt, LLM Guard through ``scan_prompt``), throughput for
prompts arriving in batches of 32 (guardmerge: ``prefetch`` runs each batch in batched passes,
prompts of similar length together; the texts in a fixed shuffled order, so batches mix tasks and
lengths; LLM Guard has no batch API: 32 ``scan_prompt`` calls), import time (the tool, torch,
transformers and the runtime), load time (building the scanners), peak RSS of the process
(VmHWM), disk size of the model files, each scanner's verdict agreement with LLM Guard's
(PyTorch, the experts' reference) and each side's test macro-F1 per task. Speed ratios pair each
tool's fastest mode; memory and disk ratios each tool's smallest. In the llm-guard environment
it also runs the README example (guardmerge's scanners through the real ``llm_guard.scan_prompt``)
and checks its verdicts equal those of the same scanners called directly and those of the
guardmerge PyTorch run.

Writes benchmarks/results/vs_llm_guard.json (``single_prompt_speedup``, ``batch32_speedup``:
guardmerge's best backend against LLM Guard's best mode; every row with the commit and date that
produced it) and regenerates BENCHMARKS.md (``--smoke`` writes WORK/vs_llm_guard/smoke.json and
leaves both alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings

from provenance import environment, produced
from toolenv import tool_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "vs_llm_guard_worker.py"
log = logging.getLogger("bench.vs_llm_guard")

LLM_GUARD_VERSION = "0.3.16"
LLM_GUARD_PACKAGES = {
    "with_onnx": ["torch==2.13.0", f"llm-guard[onnxruntime]=={LLM_GUARD_VERSION}"],
    "plain": ["torch==2.13.0", f"llm-guard=={LLM_GUARD_VERSION}"],
}
TASKS = ("injection", "hate", "offensive", "emotion", "irony")
LLM_GUARD_SCANNERS: dict[str, dict[str, Any]] = {
    # PromptInjection: score = p(INJECTION) of the top label (1 - p otherwise), flagged above threshold
    "injection": {"kind": "PromptInjection", "labels": ["SAFE", "INJECTION"]},
    # Toxicity: every label (top_k=None); flagged when a label of its toxic list is above threshold
    "hate": {
        "kind": "Toxicity",
        "labels": ["non_toxic", "toxicity"],
        "pipeline_kwargs": {"top_k": None, "function_to_apply": "softmax"},
    },
    "offensive": {
        "kind": "Toxicity",
        "labels": ["non_toxic", "insult"],
        "pipeline_kwargs": {"top_k": None, "function_to_apply": "softmax"},
    },
    # Language: every label; flagged when a label outside valid_languages is above threshold
    "emotion": {"kind": "Language", "labels": None, "valid_first": True, "pipeline_kwargs": {"top_k": None}},
    # Gibberish: score = p of a gibberish label (word salad, noise, mild gibberish), flagged above
    "irony": {"kind": "Gibberish", "labels": ["clean", "word salad"]},
}
"""Task -> the LLM Guard scanner its expert runs in, and the label names it is re-exported with
(None: as it is)."""
GUARDMERGE_BACKENDS = ("torch", "onnx", "int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# ------------------------------------------------------------------------------------ set-up


def llm_guard_env(work: Path) -> tuple[Path, str]:
    """The llm-guard environment's python, and how its ONNX mode stands (``installed`` or why not)."""
    folder = work / "llm_guard_venv"
    try:
        python = tool_env(folder, LLM_GUARD_PACKAGES["with_onnx"], "llm-guard", LLM_GUARD_VERSION)
    except subprocess.CalledProcessError as exc:
        log.warning("llm-guard[onnxruntime] did not install (%s); installing llm-guard alone", exc)
        shutil.rmtree(folder, ignore_errors=True)
        python = tool_env(folder, LLM_GUARD_PACKAGES["plain"], "llm-guard", LLM_GUARD_VERSION)
    probe = subprocess.run(
        [str(python), "-c", "import optimum.onnxruntime"], capture_output=True, text=True, env=_env()
    )
    if probe.returncode:
        return python, f"not installed: {probe.stderr.strip().splitlines()[-1][:200] if probe.stderr else '?'}"
    return python, "installed"


def relabelled_experts(experts: Mapping[str, Path], out: Path) -> dict[str, Path]:
    """Each expert as LLM Guard's scanner reads it: weights and tokenizer copied, ``id2label``
    renamed to :data:`LLM_GUARD_SCANNERS`' labels (the expert's own folder when it needs none)."""
    folders = {}
    for task, folder in experts.items():
        labels = LLM_GUARD_SCANNERS[task]["labels"]
        if labels is None:
            folders[task] = folder
            continue
        config = json.loads((folder / "config.json").read_text())
        if len(config["id2label"]) != len(labels):
            raise SystemExit(f"expert {task} has labels {config['id2label']}, LLM Guard's scanner reads {labels}")
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        target = out / task
        if not _same_json(target / "config.json", config) or not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for f in ("model.safetensors", *TOKENIZER_FILES):
                if (folder / f).is_file():
                    shutil.copy2(folder / f, target / f)
            (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        folders[task] = target
    return folders


def _same_json(path: Path, data: Any) -> bool:
    return path.is_file() and json.loads(path.read_text()) == data


def merged_model(data: Path, work: Path, experts: Mapping[str, Path], row: str | None) -> tuple[Path, dict[str, Any]]:
    """The guard benchmark's merged five-head model for quality ``row`` (default: the best by
    validation), built as benchmarks/guard.py builds it and saved once under WORK/vs_llm_guard."""
    from guard_bench import best_row

    guard_json = HERE / "results" / "guard.json"
    results = json.loads(guard_json.read_text()) if guard_json.is_file() else {}
    row = row or best_row(results)
    entry = results.get("methods", {}).get(row)
    if entry is None:
        raise SystemExit(f"quality row '{row}' is not in {guard_json}; known: {', '.join(results.get('methods', {}))}")
    method, params = entry.get("method", row.removesuffix("+align")), entry["hyperparameters"]
    align = row.endswith("+align")
    key = json.dumps([row, method, params, {t: str(p) for t, p in sorted(experts.items())}], sort_keys=True)
    folder = work / "vs_llm_guard" / f"merged-{row.replace('+', '_')}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    info = {"row": row, "method": method, "hyperparameters": params, "align": align, "folder": str(folder)}
    if (folder / "config.json").is_file():
        return folder, info
    from guard_bench import Bench

    log.info("building the merged model of row %s (%s %s)", row, method, params)
    bench = Bench(data, work, experts, None, None)
    bench.merged(bench.config(method, params, align=align)).save_pretrained(folder)
    return folder, info


def onnx_exports(merged: Path) -> dict[str, Path]:
    """The merged model as ONNX fp32 and int8 folders beside it, exported afresh by this code (an
    export from older code, e.g. one without weight digests, would time older code)."""
    import guardmerge
    from guardmerge.export.onnx import export_onnx

    out = {
        "torch": merged,
        "onnx": merged.with_name(merged.name + "-onnx"),
        "int8": merged.with_name(merged.name + "-int8"),
    }
    model = guardmerge.load(str(merged))
    for mode, quantize in (("onnx", None), ("int8", "int8")):
        export_onnx(model, out[mode], quantize=quantize, force=True)
    return out


def guard_texts(data: Path, per_task: int | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The first ``per_task`` test texts of each task (non-blank), in task order, and per task its
    span in that list, gold labels and label names."""
    from guardmerge.data import load_task

    texts: list[str] = []
    gold: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        td = load_task(data / task)
        ex = td.split("test")
        pairs = [(t, y) for t, y in zip(ex.texts, ex.labels or []) if t.strip()][:per_task]
        gold[task] = {"start": len(texts), "labels": [y for _, y in pairs], "names": td.labels}
        texts += [t for t, _ in pairs]
    return texts, gold


# ----------------------------------------------------------------------------------- running


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", **extra}


def run_worker(python: Path, job: dict[str, Any], jobs: Path, name: str, **env: str) -> dict[str, Any]:
    """Run benchmarks/vs_llm_guard_worker.py on ``job`` with ``python`` in a fresh process."""
    jobs.mkdir(parents=True, exist_ok=True)
    job_file, out_file = jobs / f"{name}.job.json", jobs / f"{name}.out.json"
    out_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    log.info("running %s", name)
    started = time.perf_counter()
    res = subprocess.run(
        [str(python), str(WORKER), str(job_file), str(out_file)], capture_output=True, text=True, env=_env(**env)
    )
    if res.returncode or not out_file.is_file():
        raise RuntimeError(f"{name} failed ({res.returncode}): {res.stderr[-3000:]}")
    out = json.loads(out_file.read_text())
    out["process_s"] = time.perf_counter() - started
    return out


def folder_mb(folders: Sequence[Path]) -> float:
    """MiB of every file in ``folders`` (the model files a mode loads)."""
    return sum(f.stat().st_size for d in folders for f in Path(d).rglob("*") if f.is_file()) / 2**20


def scores(labels: Mapping[str, Sequence[int]], gold: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Test macro-F1 per task from one side's labels (each task on its own texts)."""
    from guardmerge.evaluate import classification_metrics

    out = {}
    for task, g in gold.items():
        pred = list(labels[task][g["start"] : g["start"] + len(g["labels"])])
        out[task] = classification_metrics(g["labels"], pred, g["names"], task)["macro_f1"]
    return out


def agreement(a: Mapping[str, Sequence[bool]], b: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """Per task, the fraction of texts on which two runs give the same verdict."""
    return {t: statistics.fmean(x == y for x, y in zip(a[t], b[t])) for t in TASKS if t in a and t in b}


def summary(run: Mapping[str, Any], gold: Mapping[str, Mapping[str, Any]], disk: float, produced: dict) -> dict:
    """A run's row: its figures without the per-text lists, plus F1, disk and provenance."""
    f1 = scores(run["labels"], gold)
    row = {k: v for k, v in run.items() if k not in ("verdicts", "labels")}
    row.update(
        macro_f1=f1,
        mean_macro_f1=statistics.fmean(f1.values()),
        flag_rate={t: 1 - statistics.fmean(v) for t, v in run["verdicts"].items()},
        disk_mb=disk,
        produced=produced,
    )
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="task folders (default ../shared/data)")
    ap.add_argument("--work", type=Path, default=HERE / ".work", help="cache folder (experts, environments, models)")
    ap.add_argument("--texts", type=int, default=None, help="test texts per task (0: all; default 200, --smoke 4)")
    ap.add_argument(
        "--smoke", action="store_true", help="a smoke run: 4 texts a task, one batch repeat, results in WORK only"
    )
    ap.add_argument("--threads", type=int, default=None, help="inference threads on both sides (default: runtime's)")
    ap.add_argument("--threshold", type=float, default=0.5, help="every scanner's threshold on both sides")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per prompt on both sides")
    ap.add_argument("--batch-repeats", type=int, default=3, help="guardmerge batch-32 passes (median)")
    ap.add_argument("--row", default=None, help="guard.json quality row to merge (default: best by validation)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vs_llm_guard.json")
    return ap.parse_args()


def llm_guard_onnx(
    python: Path, lg_models: Mapping[str, Path], work: Path, jobs: Path, onnx_status: str
) -> tuple[list[str], dict[str, Path], str]:
    """LLM Guard's modes (torch, and onnx when optimum is installed and exports every expert), the
    ONNX folders per task, and how the ONNX mode stands."""
    lg_modes = ["torch"]
    lg_onnx: dict[str, Path] = {}
    if onnx_status == "installed":
        lg_onnx = {t: work / "vs_llm_guard" / "llm_guard_onnx" / t for t in TASKS}
        try:
            job = {"side": "prepare_onnx", "exports": {t: [str(lg_models[t]), str(lg_onnx[t])] for t in TASKS}}
            run_worker(python, job, jobs, "llm_guard_prepare_onnx")
            lg_modes.append("onnx")
        except RuntimeError as exc:
            onnx_status = f"installed, but the optimum export failed: {str(exc)[-300:]}"
    return lg_modes, lg_onnx, onnx_status


def scanner_specs(
    lg_models: Mapping[str, Path], lg_onnx: Mapping[str, Path], gold: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per task, the LLM Guard scanner the worker builds: kind, model folders, labels, settings."""
    return {
        t: {
            "kind": LLM_GUARD_SCANNERS[t]["kind"],
            "path": str(lg_models[t]),
            "onnx_path": str(lg_onnx[t]) if t in lg_onnx else None,
            "labels": LLM_GUARD_SCANNERS[t]["labels"] or gold[t]["names"],
            "valid_labels": gold[t]["names"][:1],
            "pipeline_kwargs": LLM_GUARD_SCANNERS[t].get("pipeline_kwargs", {}),
        }
        for t in TASKS
    }


def run_sides(
    python: Path,
    specs: Mapping[str, Mapping[str, Any]],
    gm_folders: Mapping[str, Path],
    lg_modes: Sequence[str],
    common: Mapping[str, Any],
    repeats: int,
    gold: Mapping[str, Mapping[str, Any]],
    jobs: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every side and mode in a fresh process, alternating the tools: the raw runs and their rows."""
    runs: dict[str, dict[str, Any]] = {"llm_guard": {}, "guardmerge": {}}
    rows: dict[str, dict[str, Any]] = {"llm_guard": {}, "guardmerge": {}}
    order = [("guardmerge", "torch"), ("llm_guard", "torch"), ("guardmerge", "onnx"), ("llm_guard", "onnx")]
    order += [("guardmerge", "int8")]
    for side, mode in order:
        if side == "llm_guard" and mode not in lg_modes:
            continue
        if side == "llm_guard":
            job = {"side": side, "mode": mode, "scanners": specs, **common}
            run = run_worker(python, job, jobs, f"{side}_{mode}")
            disk = folder_mb([Path(s["onnx_path"] if mode == "onnx" else s["path"]) for s in specs.values()])
        else:
            job = {"side": side, "mode": mode, "folder": str(gm_folders[mode]), "tasks": list(TASKS), **common}
            job["batch_repeats"] = repeats
            run = run_worker(Path(sys.executable), job, jobs, f"{side}_{mode}")
            disk = folder_mb([gm_folders[mode]])
        runs[side][mode] = run
        rows[side][mode] = summary(run, gold, disk, produced())
        log.info(
            "%s %s: p50 %.1f ms, batch-32 %.1f texts/s, peak %.0f MiB, mean macro-F1 %.3f",
            side,
            mode,
            run["single"]["p50_ms"],
            run["batch32"]["texts_per_s"],
            run["peak_rss_mb"],
            rows[side][mode]["mean_macro_f1"],
        )
    return runs, rows


def integration_check(
    python: Path,
    merged: Path,
    common: Mapping[str, Any],
    jobs: Path,
    ours: Mapping[str, Sequence[bool]],
    threshold: float,
) -> dict[str, Any]:
    """The README example in the llm-guard environment: guardmerge's scanners through the real
    ``scan_prompt``, against the same scanners called directly and ``ours`` (the torch run)."""
    check: dict[str, Any]
    try:
        job = {"side": "integration", "folder": str(merged), **common}
        res = run_worker(python, job, jobs, "integration", PYTHONPATH=str(ROOT / "src"))
        check = {
            "texts": len(common["texts"]),
            "scan_prompt_keys": res["scan_prompt_keys"],
            "scan_prompt_vs_direct_mismatches": sum(
                a != b for t in TASKS for a, b in zip(res["scan_prompt_verdicts"][t], res["direct_verdicts"][t])
            ),
            # the README example keeps the default 0.5: comparable with the torch run at that threshold
            "scan_prompt_vs_guardmerge_torch_run_mismatches": sum(
                a != b for t in TASKS for a, b in zip(res["scan_prompt_verdicts"][t], ours[t])
            )
            if threshold == 0.5
            else None,
            "risk_score_grid_points": res["risk_score_grid"],
            "risk_score_mismatches_vs_llm_guard": res["risk_score_mismatches"],
            "versions": res["versions"],
            "produced": produced(),
        }
        check["equal"] = not (
            check["scan_prompt_vs_direct_mismatches"]
            or check["scan_prompt_vs_guardmerge_torch_run_mismatches"]
            or check["risk_score_mismatches_vs_llm_guard"]
        )
    except RuntimeError as exc:
        check = {"error": str(exc)[-1000:], "equal": False, "produced": produced()}
    return check


def headline(gm: Mapping[str, Mapping[str, Any]], lg: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The speed ratios (each tool's fastest mode), memory and disk ratios (each tool's smallest),
    and the goals they meet."""
    gm_single = min(gm, key=lambda m: gm[m]["single"]["p50_ms"])
    lg_single = min(lg, key=lambda m: lg[m]["single"]["p50_ms"])
    gm_batch = max(gm, key=lambda m: gm[m]["batch32"]["texts_per_s"])
    lg_batch = max(lg, key=lambda m: lg[m]["batch32"]["texts_per_s"])
    single = lg[lg_single]["single"]["p50_ms"] / gm[gm_single]["single"]["p50_ms"]
    batch = gm[gm_batch]["batch32"]["texts_per_s"] / lg[lg_batch]["batch32"]["texts_per_s"]
    # memory and disk: each tool's leanest mode against the other's
    memory = min(r["peak_rss_mb"] for r in gm.values()) / min(r["peak_rss_mb"] for r in lg.values())
    disk = min(r["disk_mb"] for r in gm.values()) / min(r["disk_mb"] for r in lg.values())
    return {
        "single_prompt_speedup": single,
        "batch32_speedup": batch,
        "headline": {
            "single_prompt": {"guardmerge": gm_single, "llm_guard": lg_single},
            "batch32": {"guardmerge": gm_batch, "llm_guard": lg_batch},
            "peak_rss_ratio": memory,
            "disk_ratio": disk,
            "note": "speed: guardmerge's best backend against LLM Guard's best mode; memory and disk: each "
            "tool's smallest mode against the other's",
        },
        "goals": {
            "single_prompt_speedup_5x": single >= 5,
            "batch32_speedup_10x": batch >= 10,
            "peak_rss_at_most_one_third": memory <= 1 / 3,
            "disk_at_most_one_third": disk <= 1 / 3,
        },
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    per_task = (4 if args.smoke else 200) if args.texts is None else (args.texts or None)
    out_path = args.work / "vs_llm_guard" / "smoke.json" if args.smoke else args.out
    repeats = 1 if args.smoke else args.batch_repeats
    warmup = 1 if args.smoke else 5

    from zoo import build_zoo

    from guardmerge.demo import default_data_dir

    data = args.data or default_data_dir()
    python, onnx_status = llm_guard_env(args.work)
    experts = {t: Path(p) for t, p in build_zoo(data, args.work, list(TASKS), progress=False).items()}
    merged, merged_info = merged_model(data, args.work, experts, args.row)
    gm_folders = onnx_exports(merged)
    lg_models = relabelled_experts(experts, args.work / "vs_llm_guard" / "llm_guard_models")
    texts, gold = guard_texts(data, per_task)
    jobs = args.work / "vs_llm_guard" / "jobs"
    common = {"texts": texts, "threads": args.threads, "max_length": args.max_length, "threshold": args.threshold}
    common["warmup"] = warmup
    lg_modes, lg_onnx, onnx_status = llm_guard_onnx(python, lg_models, args.work, jobs, onnx_status)
    specs = scanner_specs(lg_models, lg_onnx, gold)
    runs, rows = run_sides(python, specs, gm_folders, lg_modes, common, repeats, gold, jobs)
    reference = runs["llm_guard"]["torch"]["verdicts"]
    agree = {f"guardmerge {m}": agreement(r["verdicts"], reference) for m, r in runs["guardmerge"].items()}
    if "onnx" in runs["llm_guard"]:
        agree["llm_guard onnx"] = agreement(runs["llm_guard"]["onnx"]["verdicts"], reference)
    check = integration_check(python, merged, common, jobs, runs["guardmerge"]["torch"]["verdicts"], args.threshold)
    gm, lg = rows["guardmerge"], rows["llm_guard"]
    results = {
        **headline(gm, lg),
        "guardmerge": gm,
        "llm_guard": lg,
        "agreement_with_llm_guard_torch": agree,
        "integration_check": check,
        "llm_guard_onnx": onnx_status,
        "merged": merged_info,
        "llm_guard_scanners": {t: {k: v for k, v in s.items() if k in ("kind", "labels")} for t, s in specs.items()},
        "settings": {
            "texts_per_task": per_task,
            "texts": len(texts),
            "per_task": {t: len(g["labels"]) for t, g in gold.items()},
            "threads": args.threads,
            "threshold": args.threshold,
            "max_length": args.max_length,
            "batch_repeats": repeats,
            "warmup": warmup,
            "smoke": args.smoke,
            "llm_guard": LLM_GUARD_VERSION,
        },
        "environment": environment(),
        "produced": produced(),
        "seconds": time.perf_counter() - started,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    head = results["headline"]
    log.info(
        "wrote %s: single prompt %.1fx (%s vs %s), batch 32 %.1fx (%s vs %s), memory %.2f, disk %.2f",
        out_path,
        results["single_prompt_speedup"],
        head["single_prompt"]["guardmerge"],
        head["single_prompt"]["llm_guard"],
        results["batch32_speedup"],
        head["batch32"]["guardmerge"],
        head["batch32"]["llm_guard"],
        head["peak_rss_ratio"],
        head["disk_ratio"],
    )
    if not args.smoke and args.out.resolve() == (HERE / "results" / "vs_llm_guard.json").resolve():
        from report import write_report

        write_report(HERE / "results" / "guard.json", ROOT / "BENCHMARKS.md", HERE / "results")


if __name__ == "__main__":
    main()
