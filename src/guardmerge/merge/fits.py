"""Closed-form head alignment after merging (docs/algorithms.md section 3b): the pure math.

A merged encoder's features drift from what each expert's head was trained on. Given, for one
task, the head inputs of the **merged** model ``F_m`` (``[n, d]``) on n unlabelled inputs of that
task, and the **expert's** logits ``Z`` (``[n, C]``) or head inputs ``F_e`` (``[n, d]``) on the same
inputs, these functions refit in closed form (float64; linear systems are solved, never inverted):

- :func:`ridge_refit`: a linear head ``[F_m, 1] @ [W; b] ~ Z`` by ridge least squares
  ``S = (A^T A + mu I)^-1 A^T Z``, ``A = [F_m, 1]``, ``mu = 1e-2 * mean(A^2)`` by default;
  ``mu = 0`` is exact least squares (minimum-norm ``lstsq`` when ``A`` is rank-deficient).
- :func:`affine_map`: the same fit from merged to expert head inputs (``d x d``), for heads with
  a hidden layer (RoBERTa ``classifier.dense``, DistilBERT ``pre_classifier``), whose first
  Linear then absorbs the map (:func:`compose_linear`).
- :func:`moment_match`: the cheaper per-feature rescale and shift matching the expert's mean and
  standard deviation ("The Non-Local Model Merging Problem", 2024).
- :func:`per_feature_affine`: the branch-point alignment of a sharing depth (3a): per feature,
  least squares from the merged trunk's hidden states to the expert's, over tokens.

Ridge is linear in its target, so for a single-Linear head fitting the logits with ``mu = 0``
equals fitting the affine map and keeping the head. Running the models is the caller's job.
"""

from __future__ import annotations

import torch

DEFAULT_RIDGE_FACTOR = 1e-2
"""Default ``mu = DEFAULT_RIDGE_FACTOR * mean(A^2)`` with ``A = [F, 1]``."""


def _as_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, features], got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def default_ridge(features: torch.Tensor) -> float:
    """``1e-2 * mean(A^2)`` with ``A = [features, 1]`` (``features``: ``[n, d]``)."""
    f = _as_2d("features", features)
    n, d = f.shape
    return DEFAULT_RIDGE_FACTOR * float((f.square().sum() + n) / (n * (d + 1)))


def ridge_refit(
    features: torch.Tensor, targets: torch.Tensor, ridge: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``features @ W^T + b ~ targets`` by ridge least squares, float64.

    Args:
        features: ``[n, d]`` inputs (the merged model's head inputs).
        targets: ``[n, C]`` targets (the expert's logits, or its head inputs).
        ridge: ``mu`` in ``(A^T A + mu I)^-1 A^T Z`` with ``A = [features, 1]`` (the bias column is
            penalised like the rest, as in the spec); ``None``: ``1e-2 * mean(A^2)``; ``0``: exact
            least squares (minimum-norm solution when ``A`` is rank-deficient).

    Returns:
        ``(weight [C, d], bias [C])`` float64, in ``nn.Linear`` layout.
    """
    f = _as_2d("features", features)
    z = _as_2d("targets", targets)
    if f.shape[0] != z.shape[0]:
        raise ValueError(f"features have {f.shape[0]} rows but targets {z.shape[0]}")
    if f.shape[0] == 0:
        raise ValueError("cannot refit from zero examples")
    mu = default_ridge(f) if ridge is None else float(ridge)
    if mu < 0:
        raise ValueError(f"ridge must be >= 0, got {mu}")
    a = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)], dim=1)
    if mu == 0.0:
        # lstsq on A itself (not the normal equations): exact and well-defined when singular
        s = torch.linalg.lstsq(a.cpu(), z.cpu(), driver="gelsd").solution.to(f.device)
    else:
        gram = a.T @ a
        gram.diagonal().add_(mu)
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            s = torch.cholesky_solve(a.T @ z, factor)
        else:  # not expected for mu > 0; a general solve as the safety net
            s = torch.linalg.solve(gram, a.T @ z)
    return s[:-1].T.contiguous(), s[-1].contiguous()


def affine_map(
    merged_feats: torch.Tensor, expert_feats: torch.Tensor, ridge: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``x -> M x + c`` taking merged head inputs to the expert's, float64.

    Args:
        merged_feats: ``[n, d]`` the merged model's head inputs.
        expert_feats: ``[n, d]`` the expert's head inputs on the same examples.
        ridge: as in :func:`ridge_refit` (``None``: ``1e-2 * mean(A^2)``; ``0``: least squares).

    Returns:
        ``(M [d, d], c [d])``; apply to a head with :func:`compose_linear`.
    """
    return ridge_refit(merged_feats, expert_feats, ridge)


def moment_match(
    merged_feats: torch.Tensor, expert_feats: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature ``x -> scale * x + shift`` matching the expert's mean and std, float64.

    ``scale = std_e / std_m``, ``shift = mean_e - scale * mean_m`` (population statistics). A
    merged feature with ``std_m <= eps`` (constant) keeps ``scale = 1`` and is only shifted.

    Returns:
        ``(scale [d], shift [d])``; ``compose_linear(W, b, scale, shift)`` folds them into a head.
    """
    m = _as_2d("merged_feats", merged_feats)
    e = _as_2d("expert_feats", expert_feats)
    if m.shape[1] != e.shape[1]:
        raise ValueError(f"feature sizes differ: merged {m.shape[1]}, expert {e.shape[1]}")
    mean_m, mean_e = m.mean(dim=0), e.mean(dim=0)
    std_m, std_e = m.std(dim=0, unbiased=False), e.std(dim=0, unbiased=False)
    constant = std_m <= eps
    scale = torch.where(constant, torch.ones_like(std_m), std_e / torch.where(constant, 1.0, std_m))
    shift = mean_e - scale * mean_m
    return scale, shift


def compose_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    linear: torch.Tensor,
    offset: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an affine map on a Linear layer's input into the layer.

    ``W (M x + c) + b = (W M) x + (W c + b)``.

    Args:
        weight: ``[out, d]`` the layer's weight.
        bias: ``[out]`` its bias, or ``None`` (treated as 0).
        linear: ``M``: ``[d, d]`` matrix (:func:`affine_map`) or ``[d]`` per-feature scale
            (:func:`moment_match`).
        offset: ``c``: ``[d]``.

    Returns:
        ``(W' [out, d], b' [out])`` in ``weight``'s dtype and device.
    """
    w = weight.detach().to(torch.float64)
    m = linear.detach().to(device=w.device, dtype=torch.float64)
    c = offset.detach().to(device=w.device, dtype=torch.float64)
    if m.dim() == 1:
        new_w = w * m.unsqueeze(0)
    elif m.dim() == 2:
        new_w = w @ m
    else:
        raise ValueError(f"the map's linear part must be [d] or [d, d], got {tuple(m.shape)}")
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else (bias.detach().to(device=w.device, dtype=torch.float64))
    )
    new_b = w @ c + b
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


DEFAULT_BRANCH_RIDGE_FACTOR = 1e-3
"""Default ridge of :func:`per_feature_affine`: ``1e-3 * mean_j var(merged_j)``."""


def per_feature_affine(
    merged: torch.Tensor, expert: torch.Tensor, ridge: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature ``j``: least squares ``expert_j ~ s_j * merged_j + c_j`` with a small ridge
    pulling ``s_j`` toward 1 (the identity map), float64.

    The branch-point alignment of a sharing depth (docs/algorithms.md 3a): ``merged`` holds the
    merged trunk's hidden states at depth K, ``expert`` the expert's own, one row per token.
    ``s_j = (cov_j + mu) / (var_j + mu)``, ``c_j = mean(expert_j) - s_j mean(merged_j)``
    (population moments; the intercept is not penalised), so a constant merged feature is only
    shifted and identical inputs give the identity.

    Args:
        merged: ``[n, d]`` the trunk's hidden states (non-padding tokens).
        expert: ``[n, d]`` the expert's hidden states on the same tokens.
        ridge: ``mu``; ``None``: ``1e-3 * mean_j var(merged_j)``; ``0``: plain least squares.

    Returns:
        ``(scale [d], shift [d])`` float64.
    """
    m = _as_2d("merged", merged)
    e = _as_2d("expert", expert)
    if m.shape != e.shape:
        raise ValueError(f"merged {tuple(m.shape)} and expert {tuple(e.shape)} hidden states differ in shape")
    if m.shape[0] == 0:
        raise ValueError("cannot fit the branch alignment from zero tokens")
    mean_m, mean_e = m.mean(dim=0), e.mean(dim=0)
    dm, de = m - mean_m, e - mean_e
    var, cov = dm.square().mean(dim=0), (dm * de).mean(dim=0)
    mu = DEFAULT_BRANCH_RIDGE_FACTOR * float(var.mean()) if ridge is None else float(ridge)
    if mu < 0:
        raise ValueError(f"ridge must be >= 0, got {mu}")
    denom = var + mu
    safe = denom > 0
    scale = torch.where(safe, (cov + mu) / torch.where(safe, denom, 1.0), torch.ones_like(var))
    shift = mean_e - scale * mean_m
    return scale, shift
