"""The statistics stage (guardmerge.merge.statistics): statistics from data (computed, cached,
refused when foreign), then the merge that reads them."""

from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.data import task_texts
from guardmerge.errors import ConfigError, StatisticsError
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build
from guardmerge.merge.statistics import compute_stats, expert_statistics
from guardmerge.stats import save_stats
from tests.builders import RANDOM_TEXTS as TEXTS
from tests.builders import expert_logits


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GUARDMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def regmean(zoo: dict[str, Path], data: Path, tasks=("hate", "sentiment"), **over: object):
    return parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t, "data": str(data)} for t in tasks],
            "method": "regmean",
            "align_heads": False,
            "statistics": {"examples": 40, "batch_size": 8},
            **over,
        }
    )


def test_regmean_from_data_computes_and_caches_statistics(zoo: dict[str, Path], data_file: Path, cache: Path) -> None:
    cfg = regmean(zoo, data_file)
    first = build(MergeJob.of(cfg), progress=False)
    files = sorted((cache / "stats").iterdir())
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = build(MergeJob.of(cfg), progress=False)  # from the cache: files untouched, same merge
    assert [f.stat().st_mtime_ns for f in sorted((cache / "stats").iterdir())] == mtimes
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_regmean_one_expert_returns_the_expert(zoo: dict[str, Path], data_file: Path) -> None:
    from guardmerge.models.checkpoint import Checkpoint

    res = build(MergeJob.of(regmean(zoo, data_file, tasks=("sentiment",))), progress=False)
    with Checkpoint(zoo["sentiment"]) as ck:
        for name, merged in res.tensors.items():
            # the tiny random model's pooler sees near-identical [CLS] states: a singular Gram,
            # solved with the ridge fallback, so it is only close there
            if name in ck and not name.startswith("pooler."):
                assert torch.allclose(merged, ck.get(name), atol=1e-5), name
    model = res.to_model()
    assert torch.allclose(model.logits(TEXTS)["sentiment"], expert_logits(zoo["sentiment"], TEXTS), atol=1e-3)


def test_fisher_from_data_runs(zoo: dict[str, Path], data_file: Path) -> None:
    cfg = regmean(zoo, data_file, method="fisher")
    res = build(MergeJob.of(cfg), progress=False)
    assert "encoder.layer.0.attention.self.query.weight" in res.tensors


def test_method_needing_statistics_without_data_fails_before_work(zoo: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"method 'regmean' needs gram statistics.*expert\(s\) hate"):
        MergeJob.of(
            parse_config(
                {
                    "base_model": str(zoo["base"]),
                    "experts": [{"model": str(zoo["hate"]), "task": "hate"}],
                    "method": "regmean",
                }
            )
        )


def test_stats_file_of_another_expert_is_refused(zoo: dict[str, Path], data_file: Path, tmp_path: Path) -> None:
    cfg = regmean(zoo, data_file)
    stats = compute_stats(zoo["hate"], task_texts(data_file, 16), {"gram"}, cfg.statistics, progress=False)
    wrong = save_stats(tmp_path / "hate.safetensors", gram=stats.gram, expert=zoo["hate"])
    bad = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo["sentiment"]), "task": "sentiment", "stats": str(wrong)}],
            "method": "regmean",
        }
    )
    with pytest.raises(StatisticsError, match="belongs to another expert"):
        expert_statistics(MergeJob.of(bad), frozenset({"gram"}), progress=False)


def test_dare_regmean_computes_statistics_on_the_sparsified_experts(
    zoo: dict[str, Path], data_file: Path, cache: Path
) -> None:
    from guardmerge.merge.engine import sparsified_experts
    from guardmerge.merge.statistics import compute_stats

    full = build(MergeJob.of(regmean(zoo, data_file)), progress=False)
    same = build(
        MergeJob.of(regmean(zoo, data_file, method="dare_regmean", parameters={"density": 1.0})), progress=False
    )
    assert all(torch.allclose(full.tensors[k], same.tensors[k], atol=1e-6) for k in full.tensors)

    cfg = regmean(zoo, data_file, method="dare_regmean", parameters={"density": 0.5, "seed": 3})
    dropped = sparsified_experts(MergeJob.of(cfg))
    q = "encoder.layer.0.attention.self.query.weight"
    from guardmerge.models.checkpoint import Checkpoint

    with Checkpoint(zoo["base"]) as base, Checkpoint(zoo["hate"]) as hate:
        tau = hate.get(q) - base.get(q)
        kept = (dropped[0][q] - base.get(q)).abs() > 0
        assert 0.3 < kept.float().mean() < 0.7  # about half the entries dropped
        assert torch.allclose((dropped[0][q] - base.get(q))[kept], 2 * tau[kept], atol=1e-6)  # rescaled 1/density
    expert_stats = expert_statistics(MergeJob.of(cfg), frozenset({"gram"}), progress=False)
    on_dropped = compute_stats(
        zoo["hate"], task_texts(data_file, 40), {"gram"}, cfg.statistics, progress=False, encoder_state=dropped[0]
    )
    g = "encoder.layer.1.attention.self.query.weight"
    assert torch.allclose(expert_stats[0].gram.gram(g), on_dropped.gram.gram(g), atol=1e-8)
    plain = expert_statistics(MergeJob.of(regmean(zoo, data_file)), frozenset({"gram"}), progress=False)
    assert not torch.allclose(plain[0].gram.gram(g), on_dropped.gram.gram(g), atol=1e-6)
    merged = build(MergeJob.of(cfg), progress=False)
    assert not torch.equal(merged.tensors[q], full.tensors[q])


def test_statistics_of_a_nan_expert_are_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from guardmerge.config import StatsConfig
    from guardmerge.errors import CheckpointError
    from guardmerge.merge.statistics import compute_stats

    folder = tmp_path / "nan"
    shutil.copytree(zoo["hate"], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("inf")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        compute_stats(folder, ["a b c", "d e"], {"gram"}, StatsConfig(), progress=False)
