"""Head alignment (guardmerge.merge.align): exactness on tiny models, encoder untouched, config wiring."""

from pathlib import Path

import pytest
import torch

from guardmerge.config import AlignConfig, parse_config
from guardmerge.errors import ConfigError
from guardmerge.merge.align import FeatureCache, align_heads, head_features
from guardmerge.merge.engine import merge
from guardmerge.merge.fits import ridge_refit
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build
from tests.builders import RANDOM_TEXTS as TEXTS
from tests.builders import expert_logits, family_zoo


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def one_expert(zoo: dict[str, Path], task: str, **over: object):
    return parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[task]), "task": task}],
            "parameters": {"scaling": 1.0},
            **over,
        }
    )


def test_ridge0_alignment_of_an_exact_encoder_recovers_the_expert(zoo: dict[str, Path]) -> None:
    model = merge(MergeJob.of(one_expert(zoo, "sentiment")), progress=False).to_model()
    with torch.no_grad():  # spoil the head: alignment must bring it back from features alone
        for p in model.heads["sentiment"].parameters():
            p.normal_()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    align_heads(model, {"sentiment": zoo["sentiment"]}, {"sentiment": TEXTS}, AlignConfig(ridge=0.0))
    assert torch.allclose(model.logits(TEXTS)["sentiment"], expert_logits(zoo["sentiment"], TEXTS), atol=1e-5)
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())


def test_refit_equals_ridge_least_squares_on_the_same_features(zoo: dict[str, Path]) -> None:
    cfg = parse_config(
        {
            "base_model": str(zoo["base"]),
            "parameters": {"scaling": 0.3},
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")],
        }
    )
    model = merge(MergeJob.of(cfg), progress=False).to_model()
    merged_feats = head_features(model, "hate", TEXTS)
    cache = FeatureCache()
    expert_feats = cache.get(zoo["hate"], "hate", TEXTS, 128, 64)
    align_heads(model, {"hate": zoo["hate"]}, {"hate": TEXTS}, AlignConfig(ridge=0.5), cache)
    w, b = ridge_refit(merged_feats.head_inputs, expert_feats.logits, 0.5)
    head = model.heads["hate"].layers[0]
    assert torch.allclose(head.weight.double(), w, atol=1e-6) and torch.allclose(head.bias.double(), b, atol=1e-6)


def test_feature_cache_on_disk_is_reused(zoo: dict[str, Path], tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "feats")
    a = cache.get(zoo["hate"], "hate", TEXTS[:10], 64, 4)
    files = list((tmp_path / "feats").iterdir())
    assert len(files) == 1
    b = FeatureCache(tmp_path / "feats").get(zoo["hate"], "hate", TEXTS[:10], 64, 4)
    assert torch.equal(a.logits, b.logits)
    c = cache.get(zoo["hate"], "hate", TEXTS[:11], 64, 4)
    assert c.logits.shape[0] == 11 and len(list((tmp_path / "feats").iterdir())) == 2


def test_alignment_is_on_by_default_with_data_and_off_without(zoo: dict[str, Path], data_file: Path) -> None:
    base, hate = str(zoo["base"]), str(zoo["hate"])

    def job(**over: object) -> MergeJob:
        return MergeJob.of(parse_config({"base_model": base, "experts": [{"model": hate, "task": "t", **over}]}))

    assert job(data=str(data_file)).alignment == AlignConfig()
    assert job().alignment is None
    off = MergeJob.of(
        parse_config({"base_model": base, "experts": [{"model": hate, "task": "t", "data": "x"}], "align_heads": False})
    )
    assert off.alignment is None
    with pytest.raises(ConfigError, match="align_heads needs unlabelled texts.*expert\\(s\\) t"):
        MergeJob.of(parse_config({"base_model": base, "experts": [{"model": hate, "task": "t"}], "align_heads": True}))


@pytest.mark.parametrize("method", ["lstsq", "moments"])
def test_alignment_raises_agreement_with_the_expert(zoo: dict[str, Path], data_file: Path, method: str) -> None:
    cfg = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [
                {"model": str(zoo[t]), "task": t, "data": str(data_file)} for t in ("hate", "injection", "sentiment")
            ],
            "method": "task_arithmetic",
            "parameters": {"scaling": 0.3},
            "align_heads": {"method": method, "examples": 60},
        }
    )
    plain = merge(MergeJob.of(cfg), progress=False)
    res = build(MergeJob.of(cfg), progress=False)
    report = res.info["align_heads"]["report"]
    assert set(report) == {"hate", "injection", "sentiment"}
    for r in report.values():
        assert r["agreement_after"] >= r["agreement_before"] - 1e-9
        if method == "lstsq":  # least squares on the fitting texts can only lower the logit error
            assert r["logit_rmse_after"] < r["logit_rmse_before"]
    # encoder tensors identical to the plain merge, heads changed
    for k, v in plain.tensors.items():
        if k.startswith("heads."):
            continue
        assert torch.equal(res.tensors[k], v), k
    assert not torch.equal(res.tensors["heads.hate.classifier.weight"], plain.tensors["heads.hate.classifier.weight"])


def test_hidden_layer_head_gets_an_affine_map_and_stays_exact(tmp_path: Path) -> None:
    base, (_, e1) = family_zoo(tmp_path, "roberta")
    cfg = parse_config(
        {"base_model": str(base), "experts": [{"model": str(e1), "task": "t1"}], "parameters": {"scaling": 1.0}}
    )
    model = merge(MergeJob.of(cfg), progress=False).to_model()
    report = align_heads(model, {"t1": e1}, {"t1": TEXTS}, AlignConfig(ridge=0.0))
    assert len(model.heads["t1"].layers) == 2
    assert report["t1"]["logit_rmse_after"] < 1e-5
    assert torch.allclose(model.logits(TEXTS)["t1"], expert_logits(e1, TEXTS), atol=1e-5)
