"""The preconditioned gradient and its step-size control (reference, sections 3 and 4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kfac.decomposition import Eigen

DAMPING_METHODS = ("exact", "factored")


def factored_damping(traces: Sequence[Tensor], damping: float) -> list[Tensor]:
    """Per-factor damping for a product of k factors (reference, section 3).

    Factor i gets ``(t_i / c) * damping**(1/k)`` with ``t_i = tr(F_i)/dim(F_i)`` and
    ``c = (prod t_i)**(1/k)``; when any trace is zero every factor gets ``damping**(1/k)``
    (``pi = 1``). For k = 2 this is ``pi * sqrt(damping)`` for A and ``sqrt(damping) / pi``
    for G.

    Args:
        traces: k tensors of shape ``(groups,)``, the normalised traces ``t_i``.
        damping: lambda.

    Returns:
        k tensors of shape ``(groups,)``.
    """
    k = len(traces)
    root = damping ** (1.0 / k)
    stacked = torch.stack(list(traces))  # (k, groups)
    positive = (stacked > 0).all(dim=0)
    safe = torch.where(positive, stacked, torch.ones_like(stacked))
    geometric_mean = safe.log().mean(dim=0).exp()
    ratios = torch.where(positive, safe / geometric_mean, torch.ones_like(safe))
    return [ratio * root for ratio in ratios]


def damped_inverse_eigenvalues(
    eigen_g: Eigen, eigen_a: Eigen, damping: float, method: str = "exact"
) -> Tensor:
    """``1 / (damped eigenvalue products)`` in the Kronecker eigenbasis, ``(groups, g, a)``.

    ``exact``: ``1 / (e_G e_A^T + damping)``; ``factored``:
    ``1 / ((e_G + sqrt(damping)/pi) (e_A + pi sqrt(damping))^T)``. Depends only on the
    decompositions and the damping, so it can be reused until either changes.
    """
    return damped_inverse(eigen_g.values, eigen_a.values, damping, method)


def damped_inverse(values_g: Tensor, values_a: Tensor, damping: float, method: str) -> Tensor:
    """``damped_inverse_eigenvalues`` from the eigenvalues ``(groups, g)`` and
    ``(groups, a)`` of the two sides (of any structure: dense, block-diagonal, diagonal)."""
    if method == "exact":
        denominator = values_g.unsqueeze(-1) * values_a.unsqueeze(-2) + damping
    elif method == "factored":
        damp_g, damp_a = factored_damping([values_g.mean(dim=-1), values_a.mean(dim=-1)], damping)
        denominator = (values_g + damp_g.unsqueeze(-1)).unsqueeze(-1) * (
            values_a + damp_a.unsqueeze(-1)
        ).unsqueeze(-2)
    else:
        raise ValueError(f"method must be one of {DAMPING_METHODS}, got {method!r}")
    return denominator.reciprocal()


def rotate_and_scale(grad: Tensor, eigen_g: Eigen, eigen_a: Eigen, scale: Tensor) -> Tensor:
    """``Q_G [(Q_G^T V Q_A) * scale] Q_A^T`` for ``grad`` V of shape ``(groups, g, a)``."""
    return (
        eigen_g.vectors
        @ ((eigen_g.vectors.mT @ grad @ eigen_a.vectors) * scale)
        @ (eigen_a.vectors.mT)
    )


def precondition(
    grad: Tensor, eigen_g: Eigen, eigen_a: Eigen, damping: float, method: str = "exact"
) -> Tensor:
    """Apply the damped inverse Kronecker-factored curvature to a gradient.

    ``exact``: ``(G (x) A + damping I)^-1 vec(V)``, i.e.
    ``Q_G [(Q_G^T V Q_A) / (e_G e_A^T + damping)] Q_A^T``.
    ``factored``: ``(G + (sqrt(damping)/pi) I)^-1 V (A + pi sqrt(damping) I)^-1``.

    Args:
        grad: V, ``(groups, g_dim, a_dim)``.
        eigen_g: decomposition of G, ``(groups, g_dim, g_dim)``.
        eigen_a: decomposition of A, ``(groups, a_dim, a_dim)``.
        damping: lambda, applied now (a stale decomposition is re-damped with it).
        method: ``"exact"`` or ``"factored"``.

    Returns:
        V', same shape as ``grad``.
    """
    inverse = damped_inverse_eigenvalues(eigen_g, eigen_a, damping, method)
    return rotate_and_scale(grad, eigen_g, eigen_a, inverse)


def kl_clip_scale(weighted_inner: Tensor, kl_clip: float) -> Tensor:
    """Fisher-norm step scale ``nu = min(1, sqrt(kl_clip / s))`` (reference, section 4).

    Args:
        weighted_inner: ``s = sum over layers of lr**2 * <V', V>``, a 0-dim tensor.
        kl_clip: the clip constant c.

    Returns:
        nu as a 0-dim tensor on the same device (no host synchronisation); 1 when s <= 0.
    """
    # s <= 0 divides to inf or a negative number, whose root where() discards
    scale = (kl_clip / weighted_inner).sqrt_().clamp_(max=1.0)
    return torch.where(weighted_inner > 0, scale, 1.0)
