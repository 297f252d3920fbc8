"""The merge job: validated once against the registry, opened once for every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardmerge.config import parse_config
from guardmerge.errors import ConfigError, GuardmergeError
from guardmerge.merge.job import MergeJob


def raw(zoo: dict[str, Path], **over: object) -> dict:
    data = {
        "base_model": str(zoo["base"]),
        "experts": [
            {"model": str(zoo["hate"]), "task": "hate"},
            {"model": str(zoo["injection"]), "task": "injection", "weight": 0.5},
        ],
        "method": "task_arithmetic",
        "parameters": {"scaling": 0.5},
    }
    data.update(over)
    return data


def test_a_job_holds_typed_parameters_and_resolved_experts(zoo: dict[str, Path]) -> None:
    job = MergeJob.of(parse_config(raw(zoo)))
    assert job.params.scaling == 0.5  # type: ignore[attr-defined]
    assert [e.weight for e in job.experts] == [1.0, 0.5] and job.tasks == ["hate", "injection"]
    assert [e.folder for e in job.experts] == [zoo["hate"].resolve(), zoo["injection"].resolve()]
    assert job.alignment is None and not job.needs_data and not job.statistics


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"method": "tiez"}, r"unknown method 'tiez'.*task_arithmetic"),
        (
            {"parameters": {"lambda": 0.5}},
            r"invalid parameters for method 'task_arithmetic'.*lambda.*Known parameters: scaling",
        ),
        ({"parameters": {"scaling": "lots"}}, "scaling"),
        ({"method": "regmean", "parameters": {}}, "needs gram statistics"),
        ({"align_heads": True}, "align_heads needs unlabelled texts"),
        ({"heads": "shared", "align_heads": True}, "align_heads needs a multi-head output"),
        ({"share_layers": 1, "heads": "hm3"}, "share_layers gives each task"),
        ({"branch_align": True}, "branch_align fits the input of each task's own layers"),
        ({"method": "lot", "parameters": {}}, "runs the models on each task's texts"),
    ],
)
def test_what_needs_the_registry_is_checked_when_the_job_is_made(zoo: dict[str, Path], over: dict, match: str) -> None:
    cfg = parse_config(raw(zoo, **over))  # the schema alone accepts it
    with pytest.raises(ConfigError, match=match):
        MergeJob.of(cfg)


def test_the_session_opens_once_and_candidates_share_it(zoo: dict[str, Path]) -> None:
    job = MergeJob.of(parse_config(raw(zoo)))
    with pytest.raises(GuardmergeError, match="not open"):
        _ = job.plan
    with job.open():
        base = job.base_checkpoint
        with job.open():  # re-entrant
            assert job.base_checkpoint is base
        candidate = job.with_candidate({"scaling": 0.9}, [2.0, 1.0])
        assert candidate.is_open and candidate.base_checkpoint is base
        assert candidate.params.scaling == 0.9 and [e.weight for e in candidate.experts] == [2.0, 1.0]  # type: ignore[attr-defined]
        assert candidate.config.experts[0].weight == 2.0
        assert job.expert_model("hate") is job.expert_model("hate")  # built once
        assert set(job.plan.labels) == {"hate", "injection"}
    assert not job.is_open and not candidate.is_open
    with pytest.raises(ConfigError, match="2 weights for 3 experts|weights for"):
        job.with_candidate({}, [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("method", "stages"),
    [
        ("regmean", {"statistics"}),  # Grams from the texts, then head alignment
        ("regmean_pp", {"layerwise"}),  # layer-wise solves on the merged model, then head alignment
    ],
)
def test_a_merge_opens_the_base_and_each_expert_once(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, stages: set[str]
) -> None:
    from guardmerge.io import checkpoint as io_checkpoint
    from guardmerge.merge.stages import merge_to_folder
    from tests.builders import TEXTS

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    opens: list[Path] = []
    real_init = io_checkpoint.CheckpointFiles.__init__

    def counting_init(self: io_checkpoint.CheckpointFiles, folder: str | Path, *args: object, **kwargs: object) -> None:
        opens.append(Path(folder).resolve())
        real_init(self, folder, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(io_checkpoint.CheckpointFiles, "__init__", counting_init)
    cfg = raw(zoo, method=method, parameters={}, align_heads=True)
    for expert in cfg["experts"]:
        expert["data"] = str(data)
    job = MergeJob.of(parse_config(cfg))
    out = merge_to_folder(job, tmp_path / "out", progress=False)
    card = (out / "README.md").read_text()
    counts = {folder: opens.count(folder) for folder in set(opens)}
    inputs = [zoo["base"].resolve(), zoo["hate"].resolve(), zoo["injection"].resolve()]
    assert {f: counts.get(f, 0) for f in inputs} == dict.fromkeys(inputs, 1), counts
    assert "head alignment" in card.lower(), card  # the data stages really ran
    if "layerwise" in stages:
        assert "layer-wise" in card.lower(), card
