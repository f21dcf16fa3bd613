"""Damped inverses by Cholesky factorisation, the alternative to eigendecompositions
(reference, section 13).

With factored damping the preconditioned gradient is ``(G + d_G I)^-1 V (A + d_A I)^-1``:
once both damped inverses are formed (``cholesky_inverse``, several times cheaper than
``eigh``), each step costs two matrix products instead of four. The damping is fixed into
the inverses, so they are formed again whenever it changes; exact (Kronecker-sum) damping,
re-damping a stale decomposition and eigenvalue correction need the eigen method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kfac.preconditioning import factored_damping

INVERSE_METHODS = ("eigen", "cholesky")


def damped_inverse_pair(a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``((A + d_A I)^-1, (G + d_G I)^-1)`` with the pi-corrected factored damping.

    Args:
        a: ``(groups, a, a)`` symmetric positive semi-definite factors.
        g: ``(groups, g, g)``.
        damping: lambda > 0.

    Returns:
        The two inverses, same shapes. A matrix whose Cholesky factorisation fails (not
        positive definite after damping, from round-off) is inverted through a float64
        eigendecomposition with its eigenvalues clipped at zero before damping instead.
    """
    traces = [torch.diagonal(m, dim1=-2, dim2=-1).mean(dim=-1) for m in (a, g)]
    damp_a, damp_g = factored_damping(traces, damping)
    return _inverse(a, damp_a), _inverse(g, damp_g)


def eigen_inverse(vectors: Tensor, values: Tensor) -> Tensor:
    """``Q diag(1 / values) Q^T`` per group: ``vectors`` ``(groups, d, d)``, ``values``
    ``(groups, d)``, positive."""
    return (vectors / values.unsqueeze(-2)) @ vectors.mT


def _inverse(matrix: Tensor, shift: Tensor) -> Tensor:
    """``(matrix + shift I)^-1`` per group, ``shift`` of shape ``(groups,)``."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    damped = matrix + shift[:, None, None] * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    inverse = torch.cholesky_inverse(factor)
    failed = info != 0
    if bool(failed.any()):  # one host read per batch, only on inversion steps
        values, vectors = torch.linalg.eigh(matrix[failed].double())
        fallback = eigen_inverse(vectors, values.clamp_min(0.0) + shift[failed].double()[:, None])
        inverse = inverse.clone()
        inverse[failed] = fallback.to(matrix.dtype)
    return inverse
