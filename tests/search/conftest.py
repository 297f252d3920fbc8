"""Search fixtures: validation data whose labels are each expert's own predictions, and a
planted scorer whose optimum is known (a real merge of the tiny experts, scored by its distance
to a target merge)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from guardmerge.config import MergeConfig, parse_config
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.search import Candidate
from guardmerge.search.objective import Report
from tests.builders import WORDS, expert_logits, make_base, make_expert

LABELS = {"hate": ["not-hate", "hate"], "injection": ["benign", "injection"], "sentiment": ["neg", "neu", "pos"]}
TASKS = ("hate", "injection", "sentiment")


def _texts(n: int = 48, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _center_head(folder: Path, texts: list[str]) -> None:
    """Set the head's bias to ``-W mean(pooled)``: a random tiny BERT's pooled outputs barely
    vary, so without this every text gets the same label."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        pooled = model.bert(**tok(texts, padding=True, return_tensors="pt")).pooler_output
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state["classifier.bias"] = -(state["classifier.weight"] @ pooled.mean(0))
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def search_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny experts whose predictions vary across texts (centred heads)."""
    root = tmp_path_factory.mktemp("searchzoo")
    base = make_base(root / "base", initializer_range=0.2)
    zoo = {"base": base}
    for i, task in enumerate(TASKS):
        zoo[task] = make_expert(root / task, base, LABELS[task], seed=10 + i, scale=0.02)
        _center_head(zoo[task], _texts())
    return zoo


@pytest.fixture(scope="session")
def val_data(search_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``DIR/TASK/{labels.json, validation.jsonl}``; labels = the expert's argmax on 48 texts."""
    root = tmp_path_factory.mktemp("valdata")
    texts = _texts()
    for task in TASKS:
        folder = root / task
        folder.mkdir()
        (folder / "labels.json").write_text(json.dumps({"labels": LABELS[task]}))
        preds = expert_logits(search_zoo[task], texts).argmax(-1).tolist()
        rows = [{"text": t, "label": y} for t, y in zip(texts, preds)]
        (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def zoo_config(
    zoo: Mapping[str, Path],
    method: str = "task_arithmetic",
    parameters: dict | None = None,
    weights: Mapping[str, float] | None = None,
    tasks: tuple[str, ...] = TASKS,
) -> MergeConfig:
    return parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t, "weight": (weights or {}).get(t, 1.0)} for t in tasks],
            "method": method,
            "parameters": dict(parameters or {}),
            "align_heads": False,
        }
    )


class PlantedScorer:
    """Scores a candidate by how close its real merge is to the merge of ``target``:
    ``1 - ||merged - target|| / ||target - base||`` per task (the same value for every task),
    so the optimum (1.0) is exactly the target's parameters and weights."""

    def __init__(self, zoo: Mapping[str, Path], method: str, target: Candidate, fail_at: int | None = None) -> None:
        self.zoo, self.method, self.calls, self.fail_at = dict(zoo), method, 0, fail_at
        self.target = self._encoder(target)
        with Checkpoint(str(zoo["base"])) as ck:
            base = {k: ck.get(k) for k in self.target}
        self.scale = self._distance(self.target, base) or 1.0  # the target's distance to theta_0

    def _encoder(self, c: Candidate) -> dict[str, torch.Tensor]:
        weights = dict(zip(TASKS, c.weights))
        cfg = zoo_config(self.zoo, self.method, c.parameters, weights)
        return {k: v for k, v in merge(MergeJob.of(cfg), progress=False).tensors.items() if not k.startswith("heads.")}

    @staticmethod
    def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
        return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)) ** 0.5

    def __call__(self, candidate: Candidate, report: Report) -> dict[str, float]:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("planted interruption")
        score = 1.0 - self._distance(self._encoder(candidate), self.target) / self.scale
        scores: dict[str, float] = {}
        for step, task in enumerate(TASKS):
            scores[task] = score
            report(step, scores)
        return scores
