"""Eigenvalue-corrected K-FAC (EKFAC; George et al. 2018; reference, section 14).

``EigenvalueCorrectedBlock`` wraps a dense ``KroneckerBlock`` (Linear, Conv): it keeps the
Kronecker factors ``A`` and ``G`` and their eigenbases, and adds a *live* factor ``S``, the
running average of the per-example gradients' second moments in that basis,

    W_n = sum_{rows r of n} (Q_G^T g_r) (Q_A^T a_r)^T        s_batch = K sum_n W_n * W_n

used in place of the eigenvalue products: ``V' = Q_G [(Q_G^T V Q_A) / (S + lambda)] Q_A^T``.
When new decompositions are installed (at t + s under staleness), ``S`` is reset to their
eigenvalue products ``e_G e_A^T``, so the first step in a new basis is exactly K-FAC's; the
factor steps after it running-average ``S`` in that basis. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.curvature import (
    BlockDecompositions,
    CurvatureBlock,
    KroneckerBlock,
    Live,
    Operator,
)
from lightning_kfac.decomposition import Decomposition, DecompositionMethod, Eigen

#: The key of the second-moment factor.
SECOND_MOMENTS = "S"
#: Largest ``examples * g * a`` of one chunk of per-example gradients (bounds the memory).
CHUNK_ELEMENTS = 1 << 24


def _rotate(
    inputs: Tensor, outputs: Tensor, q_a: Tensor, q_g: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor]:
    """Rows in the eigenbases: ``(groups, N, S, a)`` and ``(groups, N, S, g)``."""
    if has_bias:
        inputs = F.pad(inputs, (0, 1), value=1.0)
    return inputs @ q_a.unsqueeze(1), outputs @ q_g.unsqueeze(1)


def second_moments(
    inputs: Tensor, outputs: Tensor, q_a: Tensor, q_g: Tensor, has_bias: bool
) -> Tensor:
    """``sum_n W_n * W_n`` with ``W_n = sum_s (Q_G^T g_{n,s}) (Q_A^T a_{n,s})^T``.

    Args:
        inputs: input rows ``(groups, N, S, in_features)``, example-major.
        outputs: output-gradient rows ``(groups, N, S, g)``.
        q_a: eigenbasis of ``A``, ``(groups, a, a)``.
        q_g: eigenbasis of ``G``, ``(groups, g, g)``.
        has_bias: append the homogeneous coordinate to the input rows.

    Returns:
        ``(groups, g, a)``.
    """
    rotated_a, rotated_g = _rotate(inputs, outputs, q_a, q_g, has_bias)
    groups, examples, rows, width_g = rotated_g.shape
    if rows == 1:  # W_n is an outer product: sum_n W_n**2 = (g**2)^T (a**2), one product
        return (rotated_g[:, :, 0] ** 2).mT @ (rotated_a[:, :, 0] ** 2)
    width_a = rotated_a.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, groups * width_g * width_a))
    total = rotated_a.new_zeros(groups, width_g, width_a)
    for start in range(0, examples, chunk):
        part = rotated_g[:, start : start + chunk].mT @ rotated_a[:, start : start + chunk]
        total += (part * part).sum(dim=1)
    return total


def example_gradients(
    inputs: Tensor, outputs: Tensor, q_a: Tensor, q_g: Tensor, has_bias: bool
) -> Tensor:
    """Every ``W_n`` (arguments as for ``second_moments``): ``(groups, N, g, a)``."""
    rotated_a, rotated_g = _rotate(inputs, outputs, q_a, q_g, has_bias)
    return rotated_g.mT @ rotated_a


@dataclass
class _Calls:
    """The calls of one module in one forward pass (those made before its first output
    gradient arrives), whose per-example gradients are summed before squaring."""

    made: int = 0
    reported: int = 0
    closed: bool = False
    #: Sum of the reported calls' ``W_n``, ``(groups, N, g, a)``, while calls are pending.
    total: Tensor | None = None

    def squares(self, gradients: Tensor) -> Tensor:
        """This call's share of ``sum_n (sum_calls W_n)**2``: ``(2 T + W) * W`` with ``T``
        the calls reported before, so the shares of every call that reports sum to the
        square of their sum (a call its backward never reaches has gradient zero)."""
        self.reported += 1
        if self.total is None:
            share = gradients * gradients
            self.total = gradients
        else:
            share = (2 * self.total + gradients) * gradients
            self.total = self.total + gradients
        if self.reported >= self.made:
            self.total = None
        return share.sum(dim=1)


class EigenvalueCorrectedBlock(CurvatureBlock):
    """EKFAC for a dense ``KroneckerBlock`` (its geometry, gradient layout and ``A``, ``G``
    capture are the inner block's, K-FAC-reduce included; ``S`` always comes from each
    example's true gradient, from the same examples as ``A`` and ``G`` under
    ``factor_examples``).

    Before the first decomposition the block has no basis and captures ``S = 0`` (replaced at
    the first install). A module called several times in one forward pass has each
    example's rows summed over its calls before squaring: the calls made before the first of
    their output gradients arrives are one group, and while a group has calls pending it
    holds the sum of its reported calls' per-example gradients, ``(groups, N, g, a)``.

    Args:
        inner: the dense Kronecker block of the layer.
    """

    def __init__(self, inner: KroneckerBlock) -> None:
        if not isinstance(inner, KroneckerBlock) or not getattr(inner, "dense", True):
            raise TypeError("EKFAC needs a dense KroneckerBlock (Linear or Conv layer)")
        super().__init__(inner.module)
        self.inner = inner
        #: ``(Q_A, Q_G)`` of the decompositions in use, None before the first.
        self.basis: tuple[Tensor, Tensor] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        #: The calls of the current forward pass (see the class docstring).
        self._calls: _Calls | None = None

    # -- what is kept ----------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return self.inner.parameters()

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:  # read on every hook call and step: computed once
            inner = self.inner
            moments = (inner.groups, inner.g_dim, inner.a_dim)
            self._shapes = inner.factor_shapes() | {SECOND_MOMENTS: moments}
        return self._shapes

    def live_keys(self) -> tuple[str, ...]:
        return (SECOND_MOMENTS,)

    @property
    def kind(self) -> str:
        return f"EKFAC {self.inner.kind}"

    # -- capture ---------------------------------------------------------------------------

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        inner = self.inner
        statistics, count, context = inner.capture_input(x, examples)
        if self.basis is None:
            return statistics, count, (context, None)
        rows = inner.input_rows(inner.example_major(x, examples))
        per_example = inner._per_example(rows, examples)  # checks rows against examples
        subset = inner._subset(examples)
        if subset is not None:  # the first n' examples, as the inner block takes
            per_example = per_example[:, :subset]
        if self._calls is None or self._calls.closed:
            self._calls = _Calls()
        self._calls.made += 1
        return statistics, count, (context, (per_example, examples, subset, self._calls))

    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        inner_context, saved = context
        statistics = self.inner.capture_output(grad_output, inner_context)
        inner = self.inner
        if saved is None or self.basis is None:
            shape = (inner.groups, inner.g_dim, inner.a_dim)
            statistics[SECOND_MOMENTS] = grad_output.new_zeros(shape)
            return statistics
        inputs, examples, subset, calls = saved
        calls.closed = True
        outputs = inner._example_rows(inner.output_rows, grad_output, examples, subset)
        q_a, q_g = (q.to(inputs.dtype) for q in self.basis)
        if calls.made == 1:
            moments = second_moments(inputs, outputs, q_a, q_g, inner.has_bias)
        else:
            gradients = example_gradients(inputs, outputs, q_a, q_g, inner.has_bias)
            moments = calls.squares(gradients)
        if subset is not None:  # n' examples stand for the pass's N, as for G
            moments = moments * (examples / subset)
        statistics[SECOND_MOMENTS] = moments
        return statistics

    # -- decomposition ---------------------------------------------------------------------

    def decomposition_method(self, key: str) -> DecompositionMethod:
        return self.inner.decomposition_method(key)

    def decomposition_cost(self, key: str) -> float:
        return 0.0 if key == SECOND_MOMENTS else self.inner.decomposition_cost(key)

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        return self.inner.decomposition_shapes(key)

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Decomposition:
        return self.inner.rebuild(key, tensors)

    def installed(
        self, decompositions: BlockDecompositions, running: dict[str, Tensor], new: bool
    ) -> None:
        """Capture in the new basis from now on; for new decompositions, reset ``S`` to
        their eigenvalue products ``e_G e_A^T``."""
        eigen_a, eigen_g = decompositions.get("A"), decompositions.get("G")
        if not isinstance(eigen_a, Eigen) or not isinstance(eigen_g, Eigen):
            return
        self.basis = (eigen_a.vectors, eigen_g.vectors)
        if new or SECOND_MOMENTS not in running:
            products = eigen_g.values.unsqueeze(-1) * eigen_a.values.unsqueeze(-2)
            running[SECOND_MOMENTS] = products.clone()

    # -- the gradient ----------------------------------------------------------------------

    def gradient(self) -> Tensor | None:
        return self.inner.gradient()

    def set_gradient(self, gradient: Tensor) -> None:
        self.inner.set_gradient(gradient)

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        return type(self).operator([self], [decompositions], damping, method)([gradient])[0]

    def batch_key(self) -> Hashable:
        inner = self.inner
        return (EigenvalueCorrectedBlock, inner.groups, inner.a_dim, inner.g_dim)

    @classmethod
    def operator(
        cls,
        blocks: Sequence[CurvatureBlock],
        decompositions: Sequence[BlockDecompositions],
        damping: float,
        method: str,
    ) -> Operator:
        """``Q_G [(Q_G^T V Q_A) / (S + lambda)] Q_A^T`` for every block of one shape at once
        (exact damping: EKFAC has no factored form)."""
        q_a = torch.cat([d["A"].vectors for d in decompositions])
        q_g = torch.cat([d["G"].vectors for d in decompositions])
        live = [d[SECOND_MOMENTS] for d in decompositions]
        moments = torch.cat([m.value if isinstance(m, Live) else m for m in live])
        scale = (moments.clamp_min(0.0) + damping).reciprocal().to(q_a.dtype)
        q_a_t, q_g_t = q_a.mT, q_g.mT
        counts = [block.inner.groups for block in blocks]  # type: ignore[attr-defined]

        def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
            dtype = gradients[0].dtype
            work = torch.cat(list(gradients)).to(q_a.dtype)
            out = (q_g @ ((q_g_t @ work @ q_a) * scale) @ q_a_t).to(dtype)
            return list(out.split(counts))

        return apply


def eigenvalue_corrected(blocks: dict[str, CurvatureBlock]) -> dict[str, CurvatureBlock]:
    """``blocks`` with every dense Kronecker block wrapped in EKFAC (the others as they are)."""
    return {
        name: EigenvalueCorrectedBlock(block)
        if isinstance(block, KroneckerBlock) and getattr(block, "dense", True)
        else block
        for name, block in blocks.items()
    }
