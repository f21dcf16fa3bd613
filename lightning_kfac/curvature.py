"""The curvature-block interface, and the dense Kronecker-factored block (reference, 2-3).

A *curvature block* owns all of K-FAC's math for one layer: which factors it keeps (their
keys and shapes, what is reduced across ranks), what it takes from the layer's input and
output gradient, how each factor is decomposed and what that costs, how a decomposition
is rebuilt from the tensors that travel between ranks, and how the damped inverse is
applied to the gradient. The engine and the distributions move ``(block name, factor key)``
units and never look inside a block, so a new kind of curvature is one new class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.decomposition import (
    AS_IS,
    SYMMETRIC_EIGEN,
    Decomposition,
    DecompositionMethod,
    Eigen,
    SmallMatrix,
)
from lightning_kfac.inverse import damped_inverse_pair, eigen_inverse
from lightning_kfac.preconditioning import (
    damped_inverse,
    damped_inverse_eigenvalues,
    factored_damping,
    precondition,
)
from lightning_kfac.structure import FactorStructure
from lightning_kfac.tiles import stacked

#: Kronecker blocks of one shape read and write their gradients as one stack from this many
#: on (for two, stacking costs about the host time it saves).
STACKED_GRADIENTS = 3
#: ``{factor key: decomposition}`` of one block (a key is absent until it first succeeds).
BlockDecompositions = Mapping[str, Decomposition]
#: Preconditions the gradients of a batch of blocks (same ``batch_key``), in block order.
Operator = Callable[[Sequence[Tensor]], list[Tensor]]


class CurvatureBlock(ABC):
    """One layer's curvature: its statistics, factors, decompositions and preconditioning.

    Statistics are captured in two halves. ``capture_input`` runs in the layer's forward
    hook and returns statistics that are *averaged over rows* (every position of every
    call in the factor batch). ``capture_output`` runs on the output gradient and returns
    statistics *quadratic in it*, summed over rows; the capture multiplies them by
    ``K / loss_scale**2`` (K: the number of terms the loss averages over) and averages over
    micro-batches, which is the general rule ``G = K sum_r g_r g_r^T`` of the reference.
    Every factor's key must be produced by one of the two.

    Attributes:
        module: the layer.
    """

    module: nn.Module

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # -- what is kept ----------------------------------------------------------------------

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this block preconditions; the first one's param group gives the
        learning rate for the KL clip."""

    @abstractmethod
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of every running factor (each reduced across ranks), with a
        leading groups dimension."""

    # -- capture ---------------------------------------------------------------------------

    @abstractmethod
    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        """From the layer input (detached, in the factor dtype): ``(statistics summed over
        rows, number of rows, context handed to capture_output)``.

        Args:
            x: the layer's first input.
            examples: N of this pass (a block that sums over an example's positions, such as
                K-FAC-reduce or a normalisation layer, needs it to find the batch dimension).
        """

    @abstractmethod
    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        """From autograd's output gradient (loss scale undone): statistics quadratic in it,
        summed over rows. ``grad_output`` may be autograd's own tensor: read it, never
        write it (nor ``capture_input``'s ``x``)."""

    # -- decomposition ---------------------------------------------------------------------

    def decomposition_method(self, key: str) -> DecompositionMethod:
        """How factor ``key`` is decomposed (default: symmetric eigendecomposition)."""
        return SYMMETRIC_EIGEN

    def decomposition_cost(self, key: str) -> float:
        """Relative cost of decomposing factor ``key``, for assigning work to ranks
        (default: ``groups * d**3`` for a ``(groups, d, d)`` factor)."""
        shape = self.factor_shapes()[key]
        return float(shape[0]) * shape[-1] ** 3

    @abstractmethod
    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        """Shapes of ``decomposition.tensors()`` for factor ``key``."""

    @abstractmethod
    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Decomposition:
        """The decomposition of factor ``key`` from its ``tensors()`` (after a broadcast)."""

    # -- the gradient ----------------------------------------------------------------------

    @abstractmethod
    def gradient(self) -> Tensor | None:
        """This block's gradient in the layout ``precondition`` takes, or None."""

    @abstractmethod
    def set_gradient(self, gradient: Tensor) -> None:
        """Write a preconditioned gradient back into the parameters' ``.grad``."""

    @classmethod
    def gradients(cls, blocks: Sequence[CurvatureBlock]) -> list[Tensor | None]:
        """``gradient()`` of blocks of one batch key (default: one at a time)."""
        return [block.gradient() for block in blocks]

    @classmethod
    def set_gradients(cls, blocks: Sequence[CurvatureBlock], gradients: Sequence[Tensor]) -> None:
        """``set_gradient`` of blocks of one batch key (default: one at a time)."""
        for block, gradient in zip(blocks, gradients):
            block.set_gradient(gradient)

    @abstractmethod
    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        """The damped inverse curvature applied to ``gradient``.

        Args:
            decompositions: one per factor key (all present).
            damping: lambda.
            method: the ``damping_method`` option (``"exact"`` or ``"factored"``).
        """

    def statistics_batch_key(self, x: Tensor, output: Tensor, examples: int) -> Hashable | None:
        """Calls with equal keys (of blocks of one class) may have their statistics computed
        together, by ``batched_statistics``, once the backward pass has reached them, instead
        of by ``capture_input`` and ``capture_output`` in the hooks. None (the default): in
        the hooks.

        Args:
            x: the call's input (not detached).
            output: its output.
            examples: N of the pass.
        """
        return None

    @classmethod
    def batched_statistics(
        cls, blocks: Sequence[CurvatureBlock], inputs: Tensor, grads: Tensor, examples: int
    ) -> list[tuple[dict[str, Tensor], int, dict[str, Tensor]]]:
        """``capture_input`` and ``capture_output`` of L calls of one statistics batch key at
        once: one ``(input statistics, rows, output statistics)`` per call.

        Args:
            blocks: the block of each call (a block appears once per call).
            inputs: the calls' inputs, stacked: ``(L, *x.shape)`` (detached, factor dtype).
            grads: their output gradients, stacked: ``(L, *output.shape)`` (loss scale
                undone, factor dtype).
            examples: N of the calls' pass (the ``examples`` of their batch key).
        """
        raise NotImplementedError(f"{cls.__name__} does not batch its statistics")

    @property
    def kind(self) -> str:
        """What the fit-start summary calls this block (default: its class name)."""
        return type(self).__name__

    # -- live factors ----------------------------------------------------------------------

    def live_keys(self) -> tuple[str, ...]:
        """Keys of ``factor_shapes`` that are never decomposed: running averages read as they
        are by every step's preconditioning (EKFAC's second moments). The engine hands their
        current value to ``precondition``/``operator`` inside ``decompositions``, as ``Live``;
        under data parallelism they are reduced across ranks on every factor update, and sent
        whole (they need not be symmetric). Default: none."""
        return ()

    def installed(
        self, decompositions: BlockDecompositions, running: dict[str, Tensor], new: bool
    ) -> None:
        """Called when decompositions are installed, before the step preconditions with them.

        Args:
            decompositions: the block's decompositions now in use.
            running: its running factors, which the block may change in place (EKFAC resets
                its second moments to the new eigenvalue products).
            new: False when a resumed run recomputes the decompositions it had (the running
                factors are then already those of the interrupted run).
        """
        return None

    def batch_key(self) -> Hashable:
        """Blocks with equal keys are preconditioned together by one ``operator`` (default:
        none share, each block is its own batch)."""
        return id(self)

    @classmethod
    def operator(
        cls,
        blocks: Sequence[CurvatureBlock],
        decompositions: Sequence[BlockDecompositions],
        damping: float,
        method: str,
    ) -> Operator:
        """Preconditioning for blocks of one batch key, valid while their decompositions and
        the damping stay the same (the engine caches it). Default: one block at a time."""

        def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
            return [
                block.precondition(gradient, decomposition, damping, method)
                for block, gradient, decomposition in zip(blocks, gradients, decompositions)
            ]

        return apply


@dataclass
class Live:
    """A live factor's current running average (see ``CurvatureBlock.live_keys``), handed to
    ``precondition`` with the decompositions."""

    value: Tensor

    def tensors(self) -> tuple[Tensor]:
        return (self.value,)


def gram(rows: Tensor, homogeneous: bool) -> Tensor:
    """``rows^T rows`` per group, with a trailing coordinate of ones when ``homogeneous``.

    Args:
        rows: ``(groups, M, d)``.

    Returns:
        ``(groups, d, d)``, or ``(groups, d + 1, d + 1)`` when ``homogeneous``.
    """
    if homogeneous:
        rows = F.pad(rows, (0, 1), value=1.0)
    return rows.mT @ rows


class KroneckerBlock(CurvatureBlock):
    """Dense K-FAC: ``F ~= G (x) A`` with eigendecomposed factors (reference, sections 2-3).

    Subclasses give the layer's geometry: how its input becomes rows ``a`` and its output
    gradient rows ``g``. The combined gradient is ``V = grad [W | b]``, ``(groups, g, a)``.
    Every quantity carries a leading groups dimension (1 except for grouped convolutions).

    With ``reduce`` (K-FAC-reduce, reference section 8) an example's rows are combined
    before the outer products: ``A`` from the mean of its input rows, ``G`` from the sum
    of its output-gradient rows, so that every example is one row. Right when the layer's
    positions are pooled into one prediction per example; the default, expand, treats every
    position as a row (right for a loss with one term per position).

    Each side is dense by default; ``set_structure`` makes a wide side block-diagonal or
    diagonal (reference, section 12; see ``lightning_kfac.structure``). Dense blocks of one
    shape are preconditioned together; a block with another structure on its own.

    Attributes:
        reduce: whether K-FAC-reduce is used (set before the fit starts).
        groups: number of independent ``(A, G)`` pairs.
        has_bias: whether the bias is part of ``[W | b]``.
        in_features: per-group input width without the homogeneous coordinate.
        out_features: per-group output width.
    """

    reduce: bool = False
    #: ``"eigen"``, or ``"cholesky"`` for damped inverses formed once per decomposition
    #: (factored damping only; a dense block only; see ``lightning_kfac.inverse``).
    inverse: str = "eigen"
    #: Statistics from the first n' examples of each pass (None: all; reference, 13).
    factor_examples: int | None = None
    _a_structure: FactorStructure | None = None
    _g_structure: FactorStructure | None = None
    _shapes: dict[str, tuple[int, ...]] | None = None
    #: ``_widths_key()`` once computed (False: not yet).
    _widths: Hashable | None = False
    groups: int
    has_bias: bool
    in_features: int
    out_features: int

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        bias = getattr(module, "bias", None)
        self.has_bias = bias is not None and bias.requires_grad
        self._parameters = [module.weight] + ([bias] if self.has_bias else [])

    @property
    def a_dim(self) -> int:
        """Side of the input factor ``A`` (``in_features + 1`` with a bias)."""
        return self.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        """Side of the output-gradient factor ``G``."""
        return self.out_features

    @property
    def a_structure(self) -> FactorStructure:
        """How ``A`` is stored (dense unless ``set_structure`` said otherwise)."""
        return self._a_structure or FactorStructure.dense(self.a_dim)

    @property
    def g_structure(self) -> FactorStructure:
        """How ``G`` is stored."""
        return self._g_structure or FactorStructure.dense(self.g_dim)

    @property
    def dense(self) -> bool:
        """Whether both sides are dense (keys ``"A"`` and ``"G"``)."""
        return self.a_structure.kind == "dense" and self.g_structure.kind == "dense"

    def set_structure(
        self, a: FactorStructure | None = None, g: FactorStructure | None = None
    ) -> None:
        """Store ``A`` and/or ``G`` in another structure (before the fit starts)."""
        for structure, width, side in ((a, self.a_dim, "A"), (g, self.g_dim, "G")):
            if structure is not None and structure.width != width:
                raise ValueError(f"{side} structure has width {structure.width}, not {width}")
        self._a_structure = a if a is not None else self._a_structure
        self._g_structure = g if g is not None else self._g_structure
        self._shapes, self._widths = None, False

    def _structure(self, key: str) -> FactorStructure:
        return self.a_structure if key.startswith("A") else self.g_structure

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a`` from the layer input ``x``: ``(groups, rows, in_features)``."""

    @abstractmethod
    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Rows ``g`` from the output gradient: ``(groups, rows, out_features)``."""

    def parameters(self) -> list[nn.Parameter]:
        return self._parameters

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:  # read on every hook call and step: computed once
            a, g = self.a_structure, self.g_structure
            self._shapes = a.shapes("A", self.groups) | g.shapes("G", self.groups)
        return self._shapes

    def example_major(self, x: Tensor, examples: int) -> Tensor:
        """``x`` (an input or an output gradient) with its example dimension first, as
        K-FAC-reduce needs (default: already first)."""
        return x

    #: Calls with more input-row or output elements than this compute their statistics in
    #: the hooks: beside their arithmetic the host cost that batching saves is small, and
    #: their output gradients are then not held until the backward pass ends.
    batched_elements: int = 1 << 18

    def stacked_geometry(self, x: Tensor) -> Hashable | None:
        """What besides the widths fixes how this layer's input becomes rows, when
        ``input_rows`` of inputs stacked along their leading dimension gives the rows of each
        in turn; None (the default, right for any subclass): calls are not batched."""
        return None

    def statistics_batch_key(self, x: Tensor, output: Tensor, examples: int) -> Hashable | None:
        """Dense sides, expand, and a layer whose inputs stack (``stacked_geometry``): calls
        of one class, widths, geometry, shapes and ``factor_examples`` subset batch. With a
        subset, only calls whose input and output lead with the example dimension."""
        widths = self._widths_key()  # read on every call: computed once
        if widths is None or self.reduce:
            return None
        subset = self._subset(examples)
        if subset is not None and (x.shape[0] != examples or output.shape[0] != examples):
            return None  # the subset is sliced from the stacked calls' second dimension
        geometry = self.stacked_geometry(x)
        elements = output.numel()
        rows = elements // max(self.out_features, 1) * self.in_features
        if geometry is None or max(rows, elements) > self.batched_elements:
            return None
        device = x.device
        if torch.is_autocast_enabled(device.type) and x.dtype != torch.get_autocast_dtype(
            device.type
        ):  # autograd keeps a cast copy: x itself may change in place after the layer ran
            return None
        return (widths, geometry, subset, x.shape, output.shape, x.dtype, output.dtype, device)

    def _widths_key(self) -> Hashable | None:
        """The class and widths that calls batched together share; None unless dense."""
        if self._widths is False:
            self._widths = (
                (type(self), self.groups, self.in_features, self.out_features, self.has_bias)
                if self.dense
                else None
            )
        return self._widths

    @classmethod
    def batched_statistics(
        cls, blocks: Sequence[CurvatureBlock], inputs: Tensor, grads: Tensor, examples: int
    ) -> list[tuple[dict[str, Tensor], int, dict[str, Tensor]]]:
        """One Gram product per factor for all L calls: the rows of the stacked inputs (and
        output gradients) are those of each call in turn. With ``factor_examples`` n', those
        of each call's first n' examples, ``G`` scaled by N / n' (as ``capture_output``)."""
        first, calls = blocks[0], len(blocks)
        subset = first._subset(examples)
        if subset is not None:  # the batch key made sure every call leads with its examples
            inputs, grads = inputs[:, :subset], grads[:, :subset]
        a = _per_call(first.input_rows(inputs.flatten(0, 1)), calls)
        g = _per_call(first.output_rows(grads.flatten(0, 1)), calls)
        a_statistics = gram(a, first.has_bias).unflatten(0, (calls, first.groups)).unbind(0)
        g_products = g.mT @ g
        if subset is not None:  # n' examples' output statistics stand for the pass's N
            g_products.mul_(examples / subset)
        g_statistics = g_products.unflatten(0, (calls, first.groups)).unbind(0)
        rows = a.shape[1]
        return [({"A": a}, rows, {"G": g}) for a, g in zip(a_statistics, g_statistics)]

    def _subset(self, examples: int) -> int | None:
        """How many of the pass's examples feed the factors, if not all."""
        if self.factor_examples is None or not examples or examples <= self.factor_examples:
            return None
        return self.factor_examples

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        subset = self._subset(examples)
        if not self.reduce and subset is None:
            rows = self.input_rows(x)
            return self._input_statistics(rows), rows.shape[1], None
        rows = self._example_rows(self.input_rows, x, examples, subset)
        if self.reduce:
            rows = rows.mean(dim=2)
        return (
            self._input_statistics(rows.flatten(1, -2)),
            rows.shape[1:-1].numel(),
            (
                examples,
                subset,
            ),
        )

    def _input_statistics(self, rows: Tensor) -> dict[str, Tensor]:
        if self.a_structure.kind == "dense":
            return {"A": gram(rows, self.has_bias)}
        if self.has_bias:
            rows = F.pad(rows, (0, 1), value=1.0)
        return self.a_structure.statistics("A", rows)

    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        if context is None:
            return self.g_structure.statistics("G", self.output_rows(grad_output))
        examples, subset = context
        rows = self._example_rows(self.output_rows, grad_output, examples, subset)
        if self.reduce:
            rows = rows.sum(dim=2)
        statistics = self.g_structure.statistics("G", rows.flatten(1, -2))
        if subset is None:
            return statistics
        # the output statistics of n' examples stand for the pass's N (reference, 13)
        return {key: value * (examples / subset) for key, value in statistics.items()}

    def _example_rows(self, rows_of, x: Tensor, examples: int, subset: int | None) -> Tensor:
        """Rows of the pass's first ``subset`` examples (all if None), per example:
        ``(groups, examples, S, d)``."""
        x = self.example_major(x, examples)
        if subset is not None:
            x, examples = x[:subset], subset
        return self._per_example(rows_of(x), examples)

    def _per_example(self, rows: Tensor, examples: int) -> Tensor:
        """``(groups, N * S, d)`` rows, example-major, as ``(groups, N, S, d)``."""
        groups, count, width = rows.shape
        if not examples or count % examples:
            raise ValueError(
                f"K-FAC-reduce / factor_examples / EKFAC: {type(self.module).__name__} saw "
                f"{count} rows for {examples} examples, so its rows cannot be assigned to "
                "examples; its input must be (N, ..., features) or (T, N, features)"
            )
        return rows.reshape(groups, examples, count // examples, width)

    @property
    def kind(self) -> str:
        notes = ["reduce"] if self.reduce else []
        notes += ["cholesky"] if self.inverse == "cholesky" else []
        notes += [f"first {self.factor_examples} examples"] if self.factor_examples else []
        notes += [
            f"{side} {structure.describe()}"
            for side, structure in (("A", self.a_structure), ("G", self.g_structure))
            if structure.kind != "dense"
        ]
        return f"{type(self).__name__} ({', '.join(notes)})" if notes else type(self).__name__

    def decomposition_method(self, key: str) -> DecompositionMethod:
        if self.inverse == "cholesky":
            return AS_IS  # the damped inverses are formed by ``operator``
        return self._structure(key).method()

    def decomposition_cost(self, key: str) -> float:
        shape = self.factor_shapes()[key]
        return float(shape[0]) * (shape[-1] if len(shape) == 2 else shape[-1] ** 3)

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        if self.inverse == "cholesky":
            return (self.factor_shapes()[key],)
        return self._structure(key).decomposition_shapes(key, self.factor_shapes()[key])

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> Decomposition:
        if self.inverse == "cholesky":
            return SmallMatrix(tensors[0])
        return self._structure(key).rebuild(tensors)

    def gradient(self) -> Tensor | None:
        """``V``: ``(groups, g_dim, a_dim)``, or None without a weight gradient."""
        weight_grad = self._parameters[0].grad
        if weight_grad is None:
            return None
        matrix = weight_grad.reshape(self.groups, self.out_features, self.in_features)
        if not self.has_bias:
            return matrix
        bias = self._parameters[1]
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([matrix, bias_grad.reshape(self.groups, self.out_features, 1)], dim=-1)

    def set_gradient(self, gradient: Tensor) -> None:
        weight = self._parameters[0]
        weight.grad.copy_(gradient[..., : self.in_features].reshape(weight.shape))
        if self.has_bias and self._parameters[1].grad is not None:
            self._parameters[1].grad.copy_(gradient[..., self.in_features].reshape(-1))

    @classmethod
    def gradients(cls, blocks: Sequence[CurvatureBlock]) -> list[Tensor | None]:
        """Dense blocks of one shape: their weight (and bias) gradients stacked at once."""
        stackable = _stackable_gradients(blocks)
        if stackable is None:
            return super().gradients(blocks)
        weights, biases = stackable
        first = blocks[0]
        shape = (len(blocks) * first.groups, first.out_features, first.in_features)
        matrix = torch.stack(weights).reshape(shape)
        if biases:
            matrix = torch.cat([matrix, torch.stack(biases).reshape(*shape[:2], 1)], dim=-1)
        return list(matrix.split(first.groups))

    @classmethod
    def set_gradients(cls, blocks: Sequence[CurvatureBlock], gradients: Sequence[Tensor]) -> None:
        """Two multi-tensor copies from the stacked gradients."""
        stackable = _stackable_gradients(blocks)
        if stackable is None:
            return super().set_gradients(blocks, gradients)
        weights, biases = stackable
        count, width = len(blocks), blocks[0].in_features
        matrix = stacked(gradients)  # (count * groups, out_features, a_dim)
        torch._foreach_copy_(
            weights, matrix[..., :width].reshape(count, *weights[0].shape).unbind(0)
        )
        if biases:
            torch._foreach_copy_(biases, matrix[..., width].reshape(count, -1).unbind(0))

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        if self.inverse == "cholesky":
            return self.operator([self], [decompositions], damping, method)([gradient])[0]
        if self.dense:
            eigen_a, eigen_g = decompositions["A"], decompositions["G"]
            work = gradient.to(eigen_a.vectors.dtype)
            return precondition(work, eigen_g, eigen_a, damping, method).to(gradient.dtype)
        a, g = self.a_structure, self.g_structure
        values_a, values_g = a.eigenvalues("A", decompositions), g.eigenvalues("G", decompositions)
        work = gradient.to(values_a.dtype)
        # Q_G^T V Q_A, scaled, then Q_G (.) Q_A^T; G's side rotates the transpose
        rotated = g.rotate(
            a.rotate(work, "A", decompositions, False).mT, "G", decompositions, False
        )
        scaled = rotated.mT * damped_inverse(values_g, values_a, damping, method)
        out = g.rotate(a.rotate(scaled, "A", decompositions, True).mT, "G", decompositions, True)
        return out.mT.to(gradient.dtype)

    def batch_key(self) -> Hashable:
        if not self.dense:
            return id(self)
        return (KroneckerBlock, self.inverse, self.groups, self.a_dim, self.g_dim)

    @classmethod
    def operator(
        cls,
        blocks: Sequence[CurvatureBlock],
        decompositions: Sequence[BlockDecompositions],
        damping: float,
        method: str,
    ) -> Operator:
        """All blocks of one shape at once: their eigenbases and damped inverse eigenvalues
        stacked along the groups dimension, four batched products per step. With factored
        damping the damped inverses are formed here (from the eigenbases, or with Cholesky
        inverses from the factors) and each step costs two products."""
        if getattr(blocks[0], "inverse", "eigen") == "cholesky":
            return _cholesky_operator(blocks, decompositions, damping, method)
        if not getattr(blocks[0], "dense", True):  # structured sides: one block at a time
            return super().operator(blocks, decompositions, damping, method)
        eigen_a, eigen_g = (
            Eigen(
                vectors=stacked([d[key].vectors for d in decompositions]),
                values=stacked([d[key].values for d in decompositions]),
            )
            for key in "AG"
        )
        counts = [block.groups for block in blocks]
        if method == "factored":
            damp_g, damp_a = factored_damping(
                [eigen_g.mean_eigenvalue, eigen_a.mean_eigenvalue], damping
            )
            a_inv = eigen_inverse(eigen_a.vectors, eigen_a.values + damp_a.unsqueeze(-1))
            g_inv = eigen_inverse(eigen_g.vectors, eigen_g.values + damp_g.unsqueeze(-1))
            return _inverse_pair_operator(a_inv, g_inv, counts)
        scale = damped_inverse_eigenvalues(eigen_g, eigen_a, damping, method)
        q_a, q_g = eigen_a.vectors, eigen_g.vectors
        q_a_t, q_g_t = q_a.mT, q_g.mT

        def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
            dtype = gradients[0].dtype
            work = stacked(gradients).to(q_a.dtype)
            out = (q_g @ ((q_g_t @ work @ q_a) * scale) @ q_a_t).to(dtype)
            return [out] if len(counts) == 1 else list(out.split(counts))

        return apply


def _stackable_gradients(
    blocks: Sequence[CurvatureBlock],
) -> tuple[list[Tensor], list[Tensor]] | None:
    """The weight and bias gradients of ``blocks`` (biases: none without), when they can be
    read and written as one stack; None else. That needs at least ``STACKED_GRADIENTS``
    blocks of one class that keeps ``KroneckerBlock``'s own gradient layout, each with a bias
    or none and with weights of one shape (one batch key may join a Linear and a 1x1
    convolution, or a biased layer and an unbiased one one wider), and every gradient a
    plain tensor (not None, not a sharded DTensor)."""
    first = blocks[0]
    cls = type(first)
    if (
        len(blocks) < STACKED_GRADIENTS
        or cls.gradient is not KroneckerBlock.gradient
        or cls.set_gradient is not KroneckerBlock.set_gradient
        or any(type(block) is not cls or block.has_bias != first.has_bias for block in blocks)
    ):
        return None
    # the blocks' own parameters: nn.Module attribute lookups cost more host time
    weights = [block.parameters()[0].grad for block in blocks]
    biases = [block.parameters()[1].grad for block in blocks] if first.has_bias else []
    for same in (weights, biases):
        if not all(type(g) is Tensor and g.shape == same[0].shape for g in same):
            return None
    return weights, biases


def _per_call(rows: Tensor, calls: int) -> Tensor:
    """``(groups, L * M, d)`` rows of L stacked calls as ``(L * groups, M, d)``."""
    return rows.unflatten(1, (calls, -1)).transpose(0, 1).flatten(0, 1)


def _cholesky_operator(
    blocks: Sequence[CurvatureBlock],
    decompositions: Sequence[BlockDecompositions],
    damping: float,
    method: str,
) -> Operator:
    """``(G + d_G I)^-1 V (A + d_A I)^-1`` for blocks of one shape, their damped inverses
    formed once (reference, section 13)."""
    if method != "factored":
        raise ValueError('the Cholesky inverse needs damping_method="factored"')
    a_inv, g_inv = damped_inverse_pair(
        stacked([d["A"].matrix for d in decompositions]),
        stacked([d["G"].matrix for d in decompositions]),
        damping,
    )
    return _inverse_pair_operator(a_inv, g_inv, [block.groups for block in blocks])


def _inverse_pair_operator(a_inv: Tensor, g_inv: Tensor, counts: Sequence[int]) -> Operator:
    """``G_inv V A_inv`` for the stacked gradients of blocks with ``counts`` groups each."""

    def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
        dtype = gradients[0].dtype
        out = (g_inv @ stacked(gradients).to(a_inv.dtype) @ a_inv).to(dtype)
        return [out] if len(counts) == 1 else list(out.split(counts))

    return apply
