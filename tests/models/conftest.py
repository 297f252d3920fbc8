"""Fixtures of the models wing's tests."""

from pathlib import Path

import pytest

from guardmerge.config import parse_config
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel


@pytest.fixture(scope="module")
def merged(zoo: dict[str, Path]) -> MultiHeadModel:
    """The three-head merge of the zoo (hate, injection, sentiment) at scaling 0.4."""
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "injection", "sentiment")],
            "method": "task_arithmetic",
            "parameters": {"scaling": 0.4},
        }
    )
    return merge(MergeJob.of(c), progress=False).to_model()
