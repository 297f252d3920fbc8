"""ONNX parity and int8 accuracy of a merged model on the guard test sets.

Exports MODEL to ONNX twice (fp32, and int8 with dynamic quantisation) in a temporary folder,
then runs PyTorch, ONNX fp32 and ONNX int8 over every text of the test sets of the model's
tasks (found in ``--data``), every head on every text, with the same tokenisation. Reports per
head the maximum absolute logit difference from PyTorch (fp32 goal: <= 1e-4), and per task the
macro-F1 on its own test set for the three (``guardmerge.evaluate.classification_metrics``), the
int8 change and the int8/PyTorch label agreement. Results go to
``benchmarks/results/onnx_accuracy.json``.

    python benchmarks/onnx_accuracy.py guardmerge-demo/merged [--data ../shared/data]
        [--limit N] [--batch-size 64] [--max-length 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import produced

from guardmerge import __version__

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel

log = logging.getLogger("onnx_accuracy")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
DEFAULT_OUT = HERE / "results" / "onnx_accuracy.json"


def all_logits(backend: Any, texts: list[str], batch: int) -> tuple[dict[str, np.ndarray], float]:
    """Every head's logits over ``texts`` in batches, and texts/s."""
    parts: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        for task, out in backend.logits(texts[i : i + batch]).items():
            parts.setdefault(task, []).append(out)
    rate = len(texts) / (time.perf_counter() - start)
    return {t: np.concatenate(p) for t, p in parts.items()}, rate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="A merged model folder (e.g. guardmerge-demo/merged).")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder of task folders with test.jsonl.")
    p.add_argument("--limit", type=int, default=None, help="At most this many test examples per task.")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128, help="Tokens per text (guardmerge eval's default).")
    p.add_argument("--threads", type=int, default=None, help="Inference threads (default: runtime's).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args()


def run_backends(
    model: MultiHeadModel, texts: list[str], args: argparse.Namespace
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float], dict[str, int], float, float]:
    """Export ``model`` to ONNX fp32 and int8 (in a temporary folder), run PyTorch and both exports
    over ``texts``: logits and texts/s per backend, the exports' sizes, and the export times."""
    from guardmerge.export.onnx import export_onnx
    from guardmerge.serve import OnnxBackend, TorchBackend

    tmp = Path(tempfile.mkdtemp(prefix="onnx-accuracy-"))
    try:
        t0 = time.perf_counter()
        fp32_dir = export_onnx(model, tmp / "fp32")
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        int8_dir = export_onnx(model, tmp / "int8", quantize="int8")
        quant_s = time.perf_counter() - t0
        sizes = {k: (d / "model.onnx").stat().st_size for k, d in (("fp32", fp32_dir), ("int8", int8_dir))}
        runs = {
            "torch": TorchBackend(model, max_length=args.max_length),
            "onnx_fp32": OnnxBackend(fp32_dir, max_length=args.max_length, threads=args.threads),
            "onnx_int8": OnnxBackend(int8_dir, max_length=args.max_length, threads=args.threads),
        }
        logits, speed = {}, {}
        for name, backend in runs.items():
            logits[name], speed[name] = all_logits(backend, texts, args.batch_size)
            log.info("%s: %d texts, %.1f texts/s", name, len(texts), speed[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return logits, speed, sizes, export_s, quant_s


def head_diffs(heads: Sequence[str], logits: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Per head: the largest absolute logit difference of each export from PyTorch, and int8's
    argmax agreement with it."""
    ref = logits["torch"]
    out: dict[str, Any] = {}
    for head in heads:
        out[head] = {
            f"max_abs_diff_{k}": float(np.abs(logits[f"onnx_{k}"][head] - ref[head]).max()) for k in ("fp32", "int8")
        }
        out[head]["argmax_agreement_int8"] = float(
            (logits["onnx_int8"][head].argmax(-1) == ref[head].argmax(-1)).mean()
        )
    return out


def task_scores(
    model: MultiHeadModel,
    data: Mapping[str, Any],
    spans: Mapping[str, tuple[int, int]],
    logits: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, Any]:
    """Per task, each backend's macro-F1 and accuracy on the task's own test texts, and the
    exports' macro-F1 change from PyTorch."""
    from guardmerge.evaluate import classification_metrics

    per_task: dict[str, Any] = {}
    for t, (a, b) in spans.items():
        gold = data[t].labels
        assert gold is not None, f"test set of {t} has no labels"
        names = model.labels(t)
        scores = {
            name: classification_metrics(gold, logits[name][t][a:b].argmax(-1).tolist(), names, t) for name in logits
        }
        per_task[t] = {
            "n": b - a,
            "macro_f1": {name: round(s["macro_f1"], 4) for name, s in scores.items()},
            "accuracy": {name: round(s["accuracy"], 4) for name, s in scores.items()},
            "macro_f1_change_int8": round(scores["onnx_int8"]["macro_f1"] - scores["torch"]["macro_f1"], 4),
            "macro_f1_change_fp32": round(scores["onnx_fp32"]["macro_f1"] - scores["torch"]["macro_f1"], 4),
        }
    return per_task


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    import guardmerge
    from guardmerge.data import load_task

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = guardmerge.load(str(args.model))
    tasks = [t for t in model.tasks if (args.data / t / "test.jsonl").is_file()]
    if not tasks:
        raise SystemExit(f"no test.jsonl under {args.data} for any head of the model ({model.tasks})")
    data = {t: load_task(args.data / t).split("test", args.limit) for t in tasks}
    texts = [x for t in tasks for x in data[t].texts]
    spans, start = {}, 0
    for t in tasks:
        spans[t] = (start, start + len(data[t].texts))
        start += len(data[t].texts)
    load_start = os.getloadavg()
    logits, speed, sizes, export_s, quant_s = run_backends(model, texts, args)

    heads = head_diffs(model.tasks, logits)
    per_task = task_scores(model, data, spans, logits)
    fp32_max = max(h["max_abs_diff_fp32"] for h in heads.values())
    int8_max = max(h["max_abs_diff_int8"] for h in heads.values())
    report = {
        "benchmark": "onnx_accuracy",
        "model": str(args.model),
        "guardmerge_version": __version__,
        "texts": len(texts),
        "settings": {
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "threads": args.threads,
            "limit": args.limit,
            "quantization": "onnxruntime quantize_dynamic, QInt8 weights",
        },
        "produced": produced("benchmarks/onnx_accuracy.py"),
        "fp32_max_abs_diff": fp32_max,
        "fp32_goal": 1e-4,
        "fp32_within_goal": fp32_max <= 1e-4,
        "int8_max_abs_diff": int8_max,
        "heads": heads,
        "tasks": per_task,
        "texts_per_s": {k: round(v, 1) for k, v in speed.items()},
        "export_s": {"fp32": round(export_s, 2), "int8": round(quant_s, 2)},
        "model_bytes": sizes,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "fp32 max |diff| %.2e (goal 1e-4: %s); int8 max |diff| %.3f",
        fp32_max,
        "met" if fp32_max <= 1e-4 else "NOT met",
        int8_max,
    )
    for t, r in per_task.items():
        log.info(
            "%-10s macro-F1 torch %.4f  fp32 %.4f  int8 %.4f  (int8 change %+.4f)",
            t,
            r["macro_f1"]["torch"],
            r["macro_f1"]["onnx_fp32"],
            r["macro_f1"]["onnx_int8"],
            r["macro_f1_change_int8"],
        )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
