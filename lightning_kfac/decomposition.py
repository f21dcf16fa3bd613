"""Symmetric eigendecompositions of Kronecker factors, with fallbacks that never crash."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: How many times the added diagonal grows by 100x before a decomposition is given up.
JITTER_ATTEMPTS = 3


@dataclass
class Eigen:
    """``F = vectors diag(values) vectors^T`` per group.

    Attributes:
        vectors: ``(groups, d, d)``, orthonormal columns.
        values: ``(groups, d)``, clipped to be non-negative.
    """

    vectors: Tensor
    values: Tensor

    @property
    def traces(self) -> Tensor:
        """``tr(F) / d`` per group, ``(groups,)``."""
        return self.values.mean(dim=-1)


@dataclass
class DecompositionReport:
    """How a decomposition was obtained: ``"ok"``, ``"float64"``, ``"jitter"`` or ``"failed"``."""

    outcome: str
    jitter: float = 0.0


def _eigh(matrix: Tensor) -> Eigen | None:
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return Eigen(vectors=vectors, values=values.clamp_min(0.0))


def symmetric_eigen(matrix: Tensor, damping: float) -> tuple[Eigen | None, DecompositionReport]:
    """Eigendecomposition of the symmetric ``matrix`` (``(groups, d, d)``).

    Tries the matrix's own dtype, then float64, then float64 with ``delta * I`` added, where
    ``delta = max(damping, 1e-8) * max(mean diagonal, 1)`` grows 100x per attempt. The result
    is in the input dtype; eigenvalues below zero (round-off) are clipped to zero.

    Returns:
        The decomposition (None if every attempt failed) and a report of the path taken.
    """
    dtype = matrix.dtype
    result = _eigh(matrix)
    if result is not None:
        return result, DecompositionReport("ok")
    wide = matrix.double()
    result = _eigh(wide)
    if result is not None:
        return _cast(result, dtype), DecompositionReport("float64")
    scale = max(damping, 1e-8) * max(float(wide.diagonal(dim1=-2, dim2=-1).abs().mean()), 1.0)
    if not torch.isfinite(wide).all():
        return None, DecompositionReport("failed")
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    for attempt in range(JITTER_ATTEMPTS):
        delta = scale * 100.0**attempt
        result = _eigh(wide + delta * eye)
        if result is not None:
            return _cast(result, dtype), DecompositionReport("jitter", delta)
    return None, DecompositionReport("failed")


def _cast(eigen: Eigen, dtype: torch.dtype) -> Eigen:
    return Eigen(vectors=eigen.vectors.to(dtype), values=eigen.values.to(dtype))
