from __future__ import annotations

import pytest
import torch

from guardmerge.io.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_is_as_strict_as_isfinite(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(301, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x) and all_finite(x.t())
    for index in [(0, 0), (150, 3), (300, 6)]:
        y = x.clone()
        y[index] = bad
        assert not all_finite(y) and not all_finite(y.t()) and not all_finite(y[index[0]])
        assert all_finite(y) == bool(torch.isfinite(y).all())


def test_all_finite_edge_cases() -> None:
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5)) and all_finite(torch.tensor(2.0))
    assert not all_finite(torch.tensor(float("nan"))) and not all_finite(torch.full((9,), float("nan")))
    assert all_finite(torch.full((4,), torch.finfo(torch.float16).max, dtype=torch.float16))
    w = torch.nn.Parameter(torch.ones(3))
    assert all_finite(w)  # a parameter that requires grad


def test_finite_abs_max_is_the_largest_magnitude_or_none() -> None:
    from guardmerge.io.finite import finite_abs_max

    assert finite_abs_max(torch.tensor([0.5, -3.0, 2.0])) == 3.0
    assert finite_abs_max(torch.tensor([[0.5, 4.0], [-1.0, 2.0]]).t()) == 4.0
    assert finite_abs_max(torch.tensor([1.0, float("inf")])) is None
    assert finite_abs_max(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)) is None
    assert finite_abs_max(torch.empty(0)) == 0.0 and finite_abs_max(torch.arange(7)) == 0.0
