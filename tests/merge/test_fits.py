"""The closed-form fits of guardmerge.merge.fits against numpy and on a tiny BERT: head alignment
(docs/algorithms.md 3b) and the branch-point alignment of a sharing depth (3a)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from guardmerge.merge.fits import (
    affine_map,
    compose_linear,
    default_ridge,
    moment_match,
    per_feature_affine,
    ridge_refit,
)


def _data(n: int = 60, d: int = 6, c: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    z = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return f, z


def test_ridge_zero_equals_numpy_lstsq() -> None:
    f, z = _data()
    w, b = ridge_refit(f, z, ridge=0.0)
    a = np.hstack([f.numpy(), np.ones((f.shape[0], 1))])
    s = np.linalg.lstsq(a, z.numpy(), rcond=None)[0]
    assert w.shape == (3, 6) and b.shape == (3,) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), s[:-1].T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), s[-1], rtol=1e-10, atol=1e-10)


def test_ridge_zero_rank_deficient_is_the_minimum_norm_lstsq() -> None:
    f, z = _data(n=4, d=6)  # fewer rows than unknowns
    w, b = ridge_refit(f, z, ridge=0.0)
    a = np.hstack([f.numpy(), np.ones((4, 1))])
    s = np.linalg.lstsq(a, z.numpy(), rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), s[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), s[-1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mu", [None, 0.3])
def test_ridge_equals_numpy_closed_form(mu: float | None) -> None:
    f, z = _data(seed=1)
    w, b = ridge_refit(f, z, ridge=mu)
    a = np.hstack([f.numpy(), np.ones((f.shape[0], 1))])
    mu_ = 1e-2 * np.mean(a**2) if mu is None else mu
    assert default_ridge(f) == pytest.approx(1e-2 * np.mean(a**2), rel=1e-12)
    s = np.linalg.solve(a.T @ a + mu_ * np.eye(a.shape[1]), a.T @ z.numpy())
    np.testing.assert_allclose(w.numpy(), s[:-1].T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.numpy(), s[-1], rtol=1e-10, atol=1e-12)


def test_affine_map_of_identical_features_is_the_identity() -> None:
    f, _ = _data(n=50, d=5, seed=2)
    m, c = affine_map(f, f, ridge=0.0)
    torch.testing.assert_close(m, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(c, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(f @ m.T + c, f, rtol=0, atol=1e-10)


def test_affine_map_recovers_an_affine_drift_and_composes_into_the_head() -> None:
    gen = torch.Generator().manual_seed(3)
    expert = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    drift = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 2 * torch.eye(4)
    merged = (expert - 0.3) @ drift.T  # the merged encoder's features: an affine image
    m, c = affine_map(merged, expert, ridge=0.0)
    torch.testing.assert_close(merged @ m.T + c, expert, rtol=0, atol=1e-9)
    weight = torch.randn(3, 4, generator=gen)
    bias = torch.randn(3, generator=gen)
    w2, b2 = compose_linear(weight, bias, m, c)
    assert w2.dtype == torch.float32 and w2.shape == (3, 4) and b2.shape == (3,)
    head_on_expert = expert.float() @ weight.T + bias
    torch.testing.assert_close(merged.float() @ w2.T + b2, head_on_expert, rtol=1e-4, atol=1e-4)


def test_moment_match_and_compose_with_a_scale_vector() -> None:
    gen = torch.Generator().manual_seed(4)
    merged = torch.randn(100, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5])
    merged[:, 2] = 7.0  # a constant merged feature: shifted only
    expert = torch.randn(100, 3, generator=gen, dtype=torch.float64) * 2 + 1
    scale, shift = moment_match(merged, expert)
    mapped = merged * scale + shift
    torch.testing.assert_close(mapped.mean(0), expert.mean(0))
    torch.testing.assert_close(mapped[:, :2].std(0, unbiased=False), expert[:, :2].std(0, unbiased=False))
    assert scale[2] == 1.0
    weight, bias = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    w2, b2 = compose_linear(weight, bias, scale, shift)
    torch.testing.assert_close(merged @ w2.T + b2, mapped @ weight.T + bias)
    _w3, b3 = compose_linear(weight, None, scale, shift)
    torch.testing.assert_close(b3, weight @ shift)


def test_refit_on_a_tiny_bert_reproduces_the_expert_logits() -> None:
    """Merged encoder == expert's, ridge 0: the refit head gives the expert's logits (1e-5)."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(3, 100, (40, 8))
    with torch.no_grad():
        pooled = model.bert(input_ids=ids).pooler_output  # the head's input [n, 16]
        logits = model(input_ids=ids).logits
    w, b = ridge_refit(pooled, logits, ridge=0.0)
    torch.testing.assert_close(pooled.double() @ w.T + b, logits.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(w.float(), model.classifier.weight.detach(), rtol=0, atol=1e-4)


def test_bad_shapes_are_refused() -> None:
    f, z = _data()
    with pytest.raises(ValueError, match="rows"):
        ridge_refit(f, z[:-1])
    with pytest.raises(ValueError, match="2-D"):
        ridge_refit(f[0], z)
    with pytest.raises(ValueError, match=">= 0"):
        ridge_refit(f, z, ridge=-1.0)


def test_per_feature_affine_is_per_feature_least_squares() -> None:
    torch.manual_seed(0)
    m = torch.randn(200, 5, dtype=torch.float64)
    e = (
        m * torch.tensor([2.0, -1.0, 0.5, 1.0, 3.0], dtype=torch.float64)
        + 0.3
        + 0.01 * torch.randn(200, 5, dtype=torch.float64)
    )
    scale, shift = per_feature_affine(m, e, ridge=0.0)
    for j in range(5):
        a = torch.stack([m[:, j], torch.ones(200, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, e[:, j : j + 1]).solution.squeeze(1)
        assert torch.allclose(scale[j], sol[0], atol=1e-10) and torch.allclose(shift[j], sol[1], atol=1e-10)
    same, zero = per_feature_affine(m, m)  # identical inputs: the identity
    assert torch.allclose(same, torch.ones(5, dtype=torch.float64)) and torch.allclose(
        zero, torch.zeros(5, dtype=torch.float64), atol=1e-12
    )
