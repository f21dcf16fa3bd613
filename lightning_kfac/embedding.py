"""``nn.Embedding``: a Linear layer on one-hot inputs, with a diagonal input factor
(reference, section 9).

The lookup ``y = W[v]`` is ``W^T onehot(v)``, so in the ``(d_out, d_in)`` orientation of the
Kronecker blocks the weight is ``W^T`` (``d x V``) and the input factor
``A = (1/R) sum_r onehot(v_r) onehot(v_r)^T`` is diagonal: ``A = diag(c)`` with ``c_v`` the
share of the batch's ``R`` lookups (every position of every call, padding included) that
hit index ``v``. It is kept as a vector. ``G = K sum_r g_r g_r^T`` is ``d x d``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.curvature import BlockDecompositions, CurvatureBlock
from lightning_kfac.decomposition import (
    DIAGONAL,
    SYMMETRIC_EIGEN,
    Decomposition,
    DecompositionMethod,
    Diagonal,
    Eigen,
)
from lightning_kfac.preconditioning import DAMPING_METHODS, factored_damping

SCALE_GRAD_BY_FREQ_REASON = (
    "scale_grad_by_freq=True divides each row's gradient by its count in the batch (not a "
    "sum of outer products, so no Kronecker factorisation)"
)
SPARSE_REASON = "sparse=True gives sparse gradients, which K-FAC does not precondition"


class EmbeddingBlock(CurvatureBlock):
    """K-FAC for ``nn.Embedding``: ``F ~= G (x) diag(c)`` acting on ``grad W^T``.

    Factors: ``"A"``, the counts ``c`` as a ``(1, V)`` vector (decomposed by
    ``DiagonalMethod``: nothing to do), and ``"G"``, ``(1, d, d)``, eigendecomposed. The
    gradient is ``grad W`` itself, ``(V, d)``; with exact damping

        grad W' = [(grad W Q_G) / (c e_G^T + lambda)] Q_G^T

    and with factored damping ``(diag(c) + pi sqrt(lambda))^-1 grad W (G + sqrt(lambda)/pi)^-1``.
    Rows that no lookup reached (``padding_idx`` among them: autograd gives it no gradient)
    stay zero.

    ``max_norm`` is supported: the renormalisation happens in place, outside autograd,
    before the lookup, so the gradient keeps its sum-of-outer-products form (as for SGD,
    a step may carry a row past ``max_norm``; its next lookup renormalises it).

    Raises:
        TypeError: for ``scale_grad_by_freq=True`` or ``sparse=True`` (the reason becomes
            the layer's entry in the fit-start summary, and it keeps its plain gradient).
    """

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module)
        if module.scale_grad_by_freq:
            raise TypeError(SCALE_GRAD_BY_FREQ_REASON)
        if module.sparse:
            raise TypeError(SPARSE_REASON)
        self.num_embeddings = module.num_embeddings
        self.embedding_dim = module.embedding_dim

    def parameters(self) -> list[nn.Parameter]:
        return [self.module.weight]

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "A": (1, self.num_embeddings),
            "G": (1, self.embedding_dim, self.embedding_dim),
        }

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        """Counts of every index (the capture hands the indices over as floats, exact below
        2**24 in float32)."""
        indices = x.reshape(-1).long()
        counts = torch.bincount(indices, minlength=self.num_embeddings).to(x.dtype)
        return {"A": counts.unsqueeze(0)}, indices.numel(), None

    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        rows = grad_output.reshape(-1, self.embedding_dim)
        return {"G": (rows.mT @ rows).unsqueeze(0)}

    def decomposition_method(self, key: str) -> DecompositionMethod:
        return DIAGONAL if key == "A" else SYMMETRIC_EIGEN

    def decomposition_cost(self, key: str) -> float:
        if key == "A":
            return float(self.num_embeddings)
        return float(self.embedding_dim) ** 3

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        if key == "A":
            return ((1, self.num_embeddings),)
        d = self.embedding_dim
        return (1, d), (1, d, d)

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Decomposition:
        if key == "A":
            return Diagonal(tensors[0])
        values, vectors = tensors
        return Eigen(vectors=vectors, values=values)

    def gradient(self) -> Tensor | None:
        """``grad W``: ``(V, d)``, or None."""
        return self.module.weight.grad

    def set_gradient(self, gradient: Tensor) -> None:
        self.module.weight.grad.copy_(gradient)

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        counts: Diagonal = decompositions["A"]
        eigen_g: Eigen = decompositions["G"]
        q_g, e_g, c = eigen_g.vectors[0], eigen_g.values[0], counts.values[0]
        work = gradient.to(q_g.dtype)
        if method == "exact":
            scale = (c.unsqueeze(-1) * e_g.unsqueeze(0) + damping).reciprocal()  # (V, d)
            out = ((work @ q_g) * scale) @ q_g.mT
        elif method == "factored":
            damp_g, damp_a = factored_damping(
                [eigen_g.mean_eigenvalue, counts.mean_eigenvalue], damping
            )
            rows = (c + damp_a).reciprocal().unsqueeze(-1)  # (V, 1)
            columns = (e_g + damp_g).reciprocal().unsqueeze(0)  # (1, d)
            out = (((work * rows) @ q_g) * columns) @ q_g.mT
        else:
            raise ValueError(f"method must be one of {DAMPING_METHODS}, got {method!r}")
        return out.to(gradient.dtype)
