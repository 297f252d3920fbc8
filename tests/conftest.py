"""Shared fixtures: tiny random BERT checkpoints written as real Hugging Face folders."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from guardmerge.merge.job import MergeJob
from tests.builders import MERGED_TASKS, make_base, make_expert, merge_cfg

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel

torch.set_num_threads(1)  # tiny models gain nothing from threads; CI and dev machines have 2 cores


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and three experts: hate (2 labels), injection (2), sentiment (3)."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_base(root / "base")
    return {
        "base": base,
        "hate": make_expert(root / "hate", base, ["not-hate", "hate"], seed=1),
        "injection": make_expert(root / "injection", base, ["benign", "injection"], seed=2),
        "sentiment": make_expert(root / "sentiment", base, ["neg", "neu", "pos"], seed=3),
    }


@pytest.fixture(scope="session")
def merged_dir(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny merged three-head model saved as a folder (hate, injection, sentiment), shared by
    the serving and integration tests."""
    from guardmerge.config import parse_config
    from guardmerge.merge.engine import merge

    cfg = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [
                {"model": str(zoo[t]), "task": t, **({"benign": ["neu"]} if t == "sentiment" else {})}
                for t in MERGED_TASKS
            ],
            "method": "task_arithmetic",
            "parameters": {"scaling": 0.4},
        }
    )
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(MergeJob.of(cfg), progress=False).to_model().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def merged_model(merged_dir: Path) -> MultiHeadModel:
    """The ``merged_dir`` model, loaded as a user loads it (``guardmerge.load``); tests must not change it."""
    import guardmerge

    return guardmerge.load(str(merged_dir))


@pytest.fixture(scope="session")
def onnx_dir(merged_model: MultiHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny merged model exported to ONNX (fp32); tests must not change it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from guardmerge.export.onnx import export_onnx

    return export_onnx(merged_model, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture
def onnx_copy(onnx_dir: Path, tmp_path: Path) -> Path:
    """A copy of :func:`onnx_dir` that a test may edit."""
    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    return out


@pytest.fixture(scope="session")
def merged_folder(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-head merge (hate, sentiment; scaling 0.5) written by the command line's write path
    (``merge_to_folder``); tests copy it before they edit it."""
    from guardmerge.config import load_config
    from guardmerge.merge.stages import merge_to_folder

    root = tmp_path_factory.mktemp("merged-folder")
    out = root / "m"
    merge_to_folder(MergeJob.of(load_config(merge_cfg(root, zoo))), out, progress=False)
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a merge config YAML and return its path."""
    import yaml

    def write(data: dict, name: str = "merge.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write
