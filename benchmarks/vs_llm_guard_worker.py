"""One side of benchmarks/vs_llm_guard.py, in a process of its own (so its peak RSS is its own).

    python vs_llm_guard_worker.py JOB.json OUT.json

``JOB.json`` (written by vs_llm_guard.py) names the side and what it runs:

- ``llm_guard`` (the llm-guard environment): LLM Guard's classifier scanners on the experts,
  PyTorch or ONNX (``use_onnx=True``, through optimum), run with ``llm_guard.scan_prompt``;
- ``guardmerge`` (guardmerge's environment): the merged model's scanners
  (``guardmerge.integrations.llm_guard``), PyTorch, ONNX fp32 or ONNX int8;
- ``integration`` (the llm-guard environment, guardmerge's ``src`` on ``PYTHONPATH``): the README
  example, guardmerge's scanners through the real ``scan_prompt``, against the same scanners
  called directly;
- ``prepare_onnx`` (the llm-guard environment): export the experts with optimum, once, for
  LLM Guard's ONNX mode.

The first two time every text one prompt at a time (the whole scanner list per prompt: p50/p95),
then batches of 32, and record load time, peak RSS and each scanner's verdict and label per text.
Top-level imports are the standard library only: the file runs in either environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.vs_llm_guard.worker")

LLM_GUARD_BATCH_NOTE = (
    "no batch API: a batch of 32 prompts is 32 scan_prompt calls (texts / total time of the timed pass)"
)


EXAMPLE_BENIGN = {"emotion": ["anger"]}
"""The README example's ``benign`` (below), for the scanners the benchmark builds beside it."""


# README example: start
def coming_from_llm_guard(merged: str, prompts: list[str], backend: str = "torch") -> list[tuple[dict, dict]]:
    from llm_guard import scan_prompt

    import guardmerge.integrations.llm_guard

    # was: input_scanners = [PromptInjection(...), Toxicity(...), ...]: one model and one pass each
    # benign: labels that never flag, where the names do not say (emotion: anger, joy, optimism, sadness)
    benign = {"emotion": ["anger"]}
    input_scanners = guardmerge.integrations.llm_guard.scanners(
        merged, thresholds={"injection": 0.5}, benign=benign, backend=backend
    )
    results = []
    for prompt in prompts:
        _, results_valid, results_score = scan_prompt(input_scanners, prompt)
        results.append((results_valid, results_score))
    return results


# README example: end


def _pct(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far: ``VmHWM`` of /proc/self/status on Linux (a new
    program's own; ``ru_maxrss`` keeps the peak of the process that started it across exec), else
    ``ru_maxrss`` (KiB on Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    texts: Sequence[str],
    scan: Callable[[str], dict[str, bool]],
    labels: Callable[[str], dict[str, int]],
    warmup: int,
    batch: Callable[[Sequence[str]], None] | None = None,
    batch_size: int = 32,
    repeats: int = 3,
    reset: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``scan`` (every scanner on one prompt) on each text in turn, then ``batch`` on
    batches of ``batch_size`` (median of ``repeats`` passes); ``reset`` empties any cache first.
    Returns the timings, and each task's verdict (valid) and label index per text."""
    for text in texts[:warmup]:
        scan(text)
        labels(text)
    if batch is not None:
        batch(texts[:batch_size])
    if reset is not None:
        reset()
    seconds: list[float] = []
    verdicts: dict[str, list[bool]] = {}
    chosen: dict[str, list[int]] = {}
    for text in texts:
        start = time.perf_counter()
        valid = scan(text)
        seconds.append(time.perf_counter() - start)
        for task, ok in valid.items():
            verdicts.setdefault(task, []).append(ok)
        for task, index in labels(text).items():
            chosen.setdefault(task, []).append(index)
    out: dict[str, Any] = {
        "single": {
            "p50_ms": _pct(seconds, 0.5),
            "p95_ms": _pct(seconds, 0.95),
            "mean_ms": 1000 * statistics.fmean(seconds),
            "texts_per_s": len(texts) / sum(seconds),
            "n": len(texts),
        },
        "verdicts": verdicts,
        "labels": chosen,
    }
    if batch is None:
        out["batch32"] = {"texts_per_s": len(texts) / sum(seconds), "n": len(texts), "how": LLM_GUARD_BATCH_NOTE}
        return out
    arriving = list(texts)
    random.Random(0).shuffle(arriving)  # each batch mixes tasks and lengths, as arriving prompts do
    runs = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        start = time.perf_counter()
        for i in range(0, len(arriving), batch_size):
            batch(arriving[i : i + batch_size])
        runs.append(time.perf_counter() - start)
    out["batch32"] = {
        "texts_per_s": len(texts) / statistics.median(runs),
        "n": len(texts),
        "repeats": repeats,
        "how": "prefetch (batched passes, similar lengths together), then every scanner on each prompt; texts "
        "in a fixed shuffled order",
    }
    return out


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads, where torch is loaded (ONNX sessions take theirs when opened)."""
    if threads and "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


# -- LLM Guard ---------------------------------------------------------------------------------


def _top_label(result: Any) -> str:
    """The best label of a text-classification pipeline's output for its first input (a dict,
    or with ``top_k=None`` a list of every label's dict)."""
    first = result[0]
    if isinstance(first, list):
        return str(max(first, key=lambda r: r["score"])["label"])
    return str(first["label"])


class _Recorder:
    """Wraps a scanner's pipeline and keeps the best label of its last call (no extra pass)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.label: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.pipeline(*args, **kwargs)
        self.label = _top_label(result)
        return result


def llm_guard_side(job: dict[str, Any]) -> dict[str, Any]:
    """LLM Guard's scanners on the experts (``job["mode"]``: torch or onnx), via ``scan_prompt``."""
    started = time.perf_counter()
    from llm_guard import scan_prompt
    from llm_guard.input_scanners import Gibberish, Language, PromptInjection, Toxicity
    from llm_guard.model import Model
    from llm_guard.util import configure_logger

    onnx = job["mode"] == "onnx"
    if onnx:
        import optimum.onnxruntime  # noqa: F401

    import torch  # noqa: F401  (its pipelines run on torch: loaded here, so its threads are set)

    configure_logger(log_level="ERROR", stream=sys.stderr)  # no log line per scan
    set_threads(job.get("threads"))
    imported = time.perf_counter()
    kinds = {"PromptInjection": PromptInjection, "Toxicity": Toxicity, "Language": Language, "Gibberish": Gibberish}
    model_kwargs: dict[str, Any] = {}
    if onnx and job.get("threads"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = job["threads"]
        options.inter_op_num_threads = 1
        model_kwargs["session_options"] = options
    scanners, recorders, names = [], {}, {}
    for task, spec in job["scanners"].items():
        pipeline_kwargs = {"truncation": True, "max_length": job["max_length"], **spec.get("pipeline_kwargs", {})}
        folder = spec["onnx_path"] if onnx else spec["path"]
        model = Model(
            path=folder, onnx_path=folder if onnx else None, pipeline_kwargs=pipeline_kwargs, kwargs=model_kwargs
        )
        # scan_prompt keys its results by class name: one subclass per task keeps two Toxicity apart
        cls = type(f"{spec['kind']}_{task}", (kinds[spec["kind"]],), {})
        args = (spec["valid_labels"],) if spec["kind"] == "Language" else ()
        scanner = cls(*args, model=model, threshold=job["threshold"], use_onnx=onnx)
        attr = "_classifier" if hasattr(scanner, "_classifier") else "_pipeline"
        recorders[task] = _Recorder(getattr(scanner, attr))
        setattr(scanner, attr, recorders[task])
        names[cls.__name__] = task
        scanners.append(scanner)
    loaded = time.perf_counter()
    label_index = {task: spec["labels"] for task, spec in job["scanners"].items()}

    def scan(text: str) -> dict[str, bool]:
        _, valid, _ = scan_prompt(scanners, text)
        return {names[k]: v for k, v in valid.items()}

    def labels(text: str) -> dict[str, int]:
        return {t: label_index[t].index(r.label) for t, r in recorders.items() if r.label is not None}

    out = measure(job["texts"], scan, labels, job["warmup"])
    onnx_used = onnx and all(
        type(getattr(r.pipeline, "model", None)).__name__.startswith("ORT") for r in recorders.values()
    )
    return {
        **out,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "startup_s": loaded - started,
        "peak_rss_mb": peak_rss_mb(),
        "onnx_runtime_used": onnx_used,
        "versions": _versions("llm-guard", "transformers", "torch", "optimum", "onnxruntime"),
    }


def prepare_onnx(job: dict[str, Any]) -> dict[str, Any]:
    """Export each expert to ONNX with optimum (what LLM Guard's ONNX mode loads), tokenizer beside it.

    optimum 1.25.2 calls ``torch.onnx.export`` as it was before torch made the dynamo exporter the
    default; with torch 2.13 it then fails to tidy up that exporter's external-data file, so the
    export runs with ``dynamo=False``: optimum's export as its own release ran it."""
    import functools

    import torch.onnx
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)  # optimum imports it at call time

    done = {}
    for task, (src, dst) in job["exports"].items():
        if not (Path(dst) / "model.onnx").is_file():
            ORTModelForSequenceClassification.from_pretrained(src, export=True).save_pretrained(dst)
            AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        done[task] = dst
    return {"exports": done}


# -- guardmerge --------------------------------------------------------------------------------


def guardmerge_side(job: dict[str, Any]) -> dict[str, Any]:
    """The merged model's scanners (``job["mode"]``: torch, onnx or int8), every scanner per prompt
    as ``scan_prompt`` runs them; batches through ``prefetch``."""
    started = time.perf_counter()
    if job["mode"] == "torch":  # imported here, not in the load (llm_guard's import brings them too)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import guardmerge.models.multihead  # noqa: F401
    else:  # the ONNX modes never import torch or transformers (tokenizer.json via tokenizers)
        import onnxruntime  # noqa: F401
    from guardmerge.integrations.llm_guard import prefetch, scanners

    set_threads(job.get("threads"))
    imported = time.perf_counter()
    backend = "torch" if job["mode"] == "torch" else "onnx"
    input_scanners = scanners(
        job["folder"],
        thresholds=dict.fromkeys(job["tasks"], job["threshold"]),
        tasks=job["tasks"],
        benign=EXAMPLE_BENIGN if "emotion" in job["tasks"] else None,  # as LLM Guard's valid_languages
        backend=backend,
        max_length=job["max_length"],
        threads=job.get("threads"),
    )
    loaded = time.perf_counter()
    label_names = {s.task: s.shared.labels[s.task] for s in input_scanners}

    def scan(text: str) -> dict[str, bool]:
        sanitized, valid = text, {}
        for s in input_scanners:  # what scan_prompt does
            sanitized, ok, _ = s.scan(sanitized)
            valid[s.task] = ok
        return valid

    def labels(text: str) -> dict[str, int]:
        return {s.task: label_names[s.task].index(s.result(text).label) for s in input_scanners}

    def batch(texts: Sequence[str]) -> None:
        prefetch(input_scanners, texts)
        for text in texts:
            scan(text)

    out = measure(
        job["texts"],
        scan,
        labels,
        job["warmup"],
        batch=batch,
        repeats=job["batch_repeats"],
        reset=input_scanners[0].clear_cache,
    )
    return {
        **out,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "startup_s": loaded - started,
        "peak_rss_mb": peak_rss_mb(),
        "passes": input_scanners[0].shared.passes,
        "torch_imported": "torch" in sys.modules,
        "versions": _versions("guardmerge", "transformers", "torch", "onnxruntime"),
    }


def integration(job: dict[str, Any]) -> dict[str, Any]:
    """The README example through the real ``scan_prompt``, against the same scanners called
    directly; and guardmerge's risk score against LLM Guard's own formula on a grid."""
    from llm_guard.util import calculate_risk_score, configure_logger

    from guardmerge.integrations.llm_guard import risk_score, scanner_name, scanners

    configure_logger(log_level="ERROR", stream=sys.stderr)
    set_threads(job.get("threads"))
    texts = job["texts"]
    through = coming_from_llm_guard(job["folder"], texts)
    direct = scanners(job["folder"], thresholds={"injection": 0.5}, benign=EXAMPLE_BENIGN)
    tasks = [s.task for s in direct]
    via_scan_prompt = {t: [valid[scanner_name(t)] for valid, _ in through] for t in tasks}
    called = {s.task: [s.scan(text)[1] for text in texts] for s in direct}
    grid = [i / 100 for i in range(101)]
    risk_mismatches = sum(
        calculate_risk_score(s, t) != risk_score(s, t) for s in grid for t in grid if not (s == 0 and t == 0)
    )
    return {
        "scan_prompt_verdicts": via_scan_prompt,
        "direct_verdicts": called,
        "scan_prompt_keys": sorted(through[0][0]) if through else [],
        "risk_score_grid": len(grid) ** 2 - 1,
        "risk_score_mismatches": risk_mismatches,
        "versions": _versions("llm-guard", "transformers", "torch"),
    }


def _versions(*dists: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for d in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            out[d] = md.version(d)
    return out


SIDES = {
    "llm_guard": llm_guard_side,
    "guardmerge": guardmerge_side,
    "integration": integration,
    "prepare_onnx": prepare_onnx,
}


def main() -> None:
    job_file, out_file = Path(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    job = json.loads(job_file.read_text())
    result = SIDES[job["side"]](job)
    out_file.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
