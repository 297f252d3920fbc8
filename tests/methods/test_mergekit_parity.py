"""Cross-check against mergekit 0.1.5 where the definitions coincide (skipped without it).

mergekit is never a dependency. To run these, use a separate environment that has it, e.g. a
virtual environment whose ``.pth`` points at this project's site-packages, with
``pip install --no-deps mergekit==0.1.5`` (it would otherwise pull another torch), then
``PYTHONPATH=src python -m pytest tests/methods/test_mergekit_parity.py``.

Where the definitions coincide: per-tensor scope; ``k = floor(density * n) >= 1`` (mergekit
keeps at least one entry); no exact zero sums in the election (mergekit elects + there, we
use the sign of the tensor's mass); DARE's draws replayed from mergekit's global RNG and its
L1 rescale (``rescale_by: l1``); mergekit's ``normalize: true`` is ``consensus: mean``, ``false``
is ``consensus: sum``; its ``lambda`` is our ``scaling``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get as mergekit_method

import guardmerge.methods.fast.sparsify as sparsify
from guardmerge.methods import METHODS
from guardmerge.methods.registry import Role, TensorContext

IDS = ["a", "b", "c"]
WEIGHTS = [1.0, 0.6, 1.7]


def tiny_bert_tensors(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (theta_0, deltas [3, *shape])`` shaped like a tiny BERT encoder's tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (50, 16),
        "encoder.layer.0.attention.self.query.weight": (16, 16),
        "encoder.layer.0.attention.self.query.bias": (16,),
        "encoder.layer.0.intermediate.dense.weight": (32, 16),
        "encoder.layer.0.output.LayerNorm.weight": (16,),
    }
    return {
        name: (torch.randn(shape, generator=g), 0.02 * torch.randn((3, *shape), generator=g))
        for name, shape in shapes.items()
    }


def mergekit_merge(method: str, base: torch.Tensor, deltas: torch.Tensor, name: str, **params: Any) -> torch.Tensor:
    tensors = [base] + [base + d for d in deltas]
    group = TensorGroup.from_tensors(tensors, ids=["base", *IDS], base_index=0, name=name)
    params["weight"] = dict(zip(IDS, WEIGHTS, strict=True))
    return mergekit_method(method)([group], parameters=params)[0]


def ours(method: str, base: torch.Tensor, deltas: torch.Tensor, name: str, **raw: Any) -> torch.Tensor:
    spec = METHODS.get(method)
    ctx = TensorContext(name, Role.LINEAR_WEIGHT)
    return base + spec.fn(base.new_tensor(0) + deltas, torch.tensor(WEIGHTS), spec.validate(raw), ctx)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=0, atol=1e-6), float((a - b).abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_task_arithmetic(seed: int) -> None:
    for name, (base, deltas) in tiny_bert_tensors(seed).items():
        ref = mergekit_merge("task_arithmetic", base, deltas, name, **{"lambda": 0.7})
        assert_close(ours("task_arithmetic", base, deltas, name, scaling=0.7), ref)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_per_tensor(density: float, normalize: bool) -> None:
    for name, (base, deltas) in tiny_bert_tensors(2).items():
        ref = mergekit_merge("ties", base, deltas, name, density=density, normalize=normalize, **{"lambda": 1.3})
        got = ours(
            "ties",
            base,
            deltas,
            name,
            density=density,
            scope="per_tensor",
            scaling=1.3,
            consensus="mean" if normalize else "sum",
        )
        assert_close(got, ref)


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.01), (0.5, 0.1)])
def test_breadcrumbs_per_tensor(density: float, gamma: float) -> None:
    for name, (base, deltas) in tiny_bert_tensors(3).items():
        for method, extra in (("breadcrumbs", {}), ("breadcrumbs_ties", {"consensus": "sum"})):
            ref = mergekit_merge(method, base, deltas, name, density=density, gamma=gamma)
            got = ours(method, base, deltas, name, density=density, gamma=gamma, scaling=1.0, **extra)
            assert_close(got, ref)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_with_rescale(method: str, normalize: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    density = 0.4
    for i, (name, (base, deltas)) in enumerate(tiny_bert_tensors(4).items()):
        torch.manual_seed(100 + i)
        ref = mergekit_merge(method, base, deltas, name, density=density, rescale=True, normalize=normalize)
        torch.manual_seed(100 + i)  # replay mergekit's draws: one bernoulli per expert, in order
        keep = torch.stack([torch.bernoulli(torch.full_like(d, density)) for d in deltas]).bool()
        flat_keep = keep.reshape(3, -1)
        monkeypatch.setattr(
            sparsify,
            "dare_keep",
            lambda gens, start, width, p, k=flat_keep: k[:, start : start + width],
        )
        raw: dict[str, Any] = {"density": density, "rescale_by": "l1", "scaling": 1.0}
        if method == "dare_ties":
            raw["consensus"] = "mean" if normalize else "sum"
            assert_close(ours(method, base, deltas, name, **raw), ref)
        elif not normalize:  # mergekit's normalize divides linear merges by sum(w): not ours
            assert_close(ours(method, base, deltas, name, **raw), ref)
