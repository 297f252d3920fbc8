"""The model card (guardmerge.merge.card) written into every merged folder: it names the base, the
method, its parameters, the version, every expert with its labels and weight, and the data stages
that ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardmerge.config import MergeConfig, parse_config
from guardmerge.merge.card import model_card
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.result import MergeResult


@pytest.fixture(scope="module")
def ties_merge(zoo: dict[str, Path]) -> tuple[MergeResult, MergeConfig]:
    config = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [
                {"model": str(zoo["hate"]), "task": "hate", "weight": 0.7},
                {"model": str(zoo["sentiment"]), "task": "sentiment"},
            ],
            "method": "ties",
            "parameters": {"density": 0.4, "scaling": 0.9},
        }
    )
    return merge(MergeJob.of(config), progress=False), config


def test_the_card_names_the_method_its_parameters_and_every_expert(
    ties_merge: tuple[MergeResult, MergeConfig], zoo: dict[str, Path]
) -> None:
    result, config = ties_merge
    card = model_card(result, config, "9.8.7")
    assert card.startswith("---\nlibrary_name: guardmerge\n")
    assert f"base_model: {zoo['base']}" in card and f"- Base model: `{zoo['base']}`" in card
    assert "with **ties**" in card and "- Method: `ties`, heads: `multi`" in card
    assert "`density=0.4`" in card and "`scaling=0.9`" in card
    assert "guardmerge 9.8.7" in card and "- guardmerge version: 9.8.7" in card
    assert "One shared bert encoder and 2 heads" in card
    assert f"| hate | not-hate, hate | `{zoo['hate']}` | 0.7 |" in card
    assert f"| sentiment | neg, neu, pos | `{zoo['sentiment']}` | 1.0 |" in card
    assert "guardmerge.load('THIS_FOLDER')" in card  # a multi-head folder is read with guardmerge
    assert "Head alignment" not in card and "Sharing depth" not in card  # no data stage ran


def test_the_card_lists_each_data_stage_that_ran(ties_merge: tuple[MergeResult, MergeConfig]) -> None:
    result, config = ties_merge
    info = {
        **result.info,
        "align_heads": {"settings": {"method": "lstsq", "examples": 60}},
        "layerwise": {"layers": 12, "tokens": {"hate": 400, "sentiment": 380}},
        "share_layers": 1,
        "branch_align": True,
        "card_sections": ["## Search\n\nbest of 20 trials"],
    }
    card = model_card(MergeResult(result.tensors, result.config, result.heads, info), config, "1.0")
    assert "- Head alignment: `lstsq` on 60 unlabelled texts per task" in card
    assert "- Layer-wise solves: 12 Linear layers solved" in card and "hate 400, sentiment 380 tokens" in card
    assert "- Sharing depth: blocks below 1 shared" in card and "aligned at the branch point" in card
    assert "## Search\n\nbest of 20 trials" in card
