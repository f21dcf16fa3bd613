"""Normalisation layers as scale-and-shift blocks (reference, section 10).

LayerNorm, GroupNorm, BatchNorm1d/2d/3d and RMSNorm compute ``y = gamma * x-hat + beta``
elementwise. For every affine element c (a channel, or one element of a multi-dimensional
``normalized_shape``) and example n, the gradient of ``(gamma_c, beta_c)`` is

    w_{n,c} = (sum_s x-hat_{n,s,c} g_{n,s,c},  sum_s g_{n,s,c})

summed over the example's positions s, with g autograd's output gradient. The block of
element c is ``F_c = K sum_n w_{n,c} w_{n,c}^T``, ``2 x 2`` (``1 x 1`` without beta),
running-averaged like the Kronecker factors and applied as ``(F_c + lambda I)^-1`` in
closed form. ``x-hat`` is recomputed from the layer input in the forward hook.

BatchNorm in training mode normalises with the batch's statistics, which couple the
examples; the statistics are treated as constants (as tensorflow/kfac and kfac-jax do), so
its per-example gradients, and its blocks, are an approximation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.curvature import BlockDecompositions, CurvatureBlock, Operator
from lightning_kfac.decomposition import AS_IS, DecompositionMethod, SmallMatrix

NO_AFFINE_REASON = "no affine parameters (nothing to precondition)"


class ScaleShiftBlock(CurvatureBlock):
    """One ``2 x 2`` (``1 x 1`` without a trainable beta) block per affine element.

    Subclasses say how ``x-hat`` is computed from the input and how a tensor shaped like the
    input is arranged per example as ``(examples, positions, elements)``.

    Factor ``"F"``: ``(elements, dim, dim)`` (the elements are the groups), kept as it is
    (``AsIsMethod``). Gradient: ``(elements, dim)``, columns ``grad gamma`` and
    ``grad beta``. The ``damping_method`` option does not apply: there is no Kronecker
    product to factor, so both give ``(F_c + lambda I)^-1``.

    Attributes:
        has_bias: whether beta is part of the block.
        elements: number of affine elements.
        dim: 2 with beta, else 1.

    Raises:
        TypeError: for a layer without affine parameters.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(NO_AFFINE_REASON)
        bias = getattr(module, "bias", None)
        self.has_bias = isinstance(bias, nn.Parameter) and bias.requires_grad
        self.elements = weight.numel()
        self.dim = 1 + int(self.has_bias)

    # -- geometry --------------------------------------------------------------------------

    @abstractmethod
    def normalize(self, x: Tensor) -> Tensor:
        """``x-hat`` from the layer input, same shape."""

    @abstractmethod
    def layout(self, x: Tensor, examples: int) -> Hashable:
        """What ``per_example`` needs to arrange tensors shaped like ``x`` (e.g. where the
        batch dimension is), decided once per call from the input."""

    @abstractmethod
    def per_example(self, t: Tensor, layout: Hashable) -> Tensor:
        """``t`` (shaped like the input) as ``(examples, positions, elements)``."""

    # -- the block -------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"F": (self.elements, self.dim, self.dim)}

    def capture_input(self, x: Tensor, examples: int) -> tuple[dict[str, Tensor], int, Any]:
        layout = self.layout(x, examples)
        xhat = self.per_example(self.normalize(x), layout)
        return {}, xhat.shape[0], (xhat, layout)

    def capture_output(self, grad_output: Tensor, context: Any) -> dict[str, Tensor]:
        xhat, layout = context
        g = self.per_example(grad_output, layout)
        parts = [(xhat * g).sum(1)] + ([g.sum(1)] if self.has_bias else [])
        w = torch.stack(parts, dim=-1).transpose(0, 1)  # (elements, examples, dim)
        return {"F": w.mT @ w}

    def decomposition_method(self, key: str) -> DecompositionMethod:
        return AS_IS

    def decomposition_cost(self, key: str) -> float:
        return float(self.elements * self.dim**2)

    def decomposition_shapes(self, key: str) -> tuple[tuple[int, ...], ...]:
        return (self.factor_shapes()[key],)

    def rebuild(self, key: str, tensors: Sequence[Tensor]) -> SmallMatrix:
        return SmallMatrix(tensors[0])

    def gradient(self) -> Tensor | None:
        """``(elements, dim)``: ``grad gamma`` and ``grad beta`` as columns, or None."""
        weight_grad = self.module.weight.grad
        if weight_grad is None:
            return None
        columns = [weight_grad.reshape(-1)]
        if self.has_bias:
            bias_grad = self.module.bias.grad
            columns.append(
                torch.zeros_like(columns[0]) if bias_grad is None else bias_grad.reshape(-1)
            )
        return torch.stack(columns, dim=-1)

    def set_gradient(self, gradient: Tensor) -> None:
        weight = self.module.weight
        weight.grad.copy_(gradient[:, 0].reshape(weight.shape))
        if self.has_bias and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(gradient[:, 1].reshape(self.module.bias.shape))

    def precondition(
        self, gradient: Tensor, decompositions: BlockDecompositions, damping: float, method: str
    ) -> Tensor:
        inverse = damped_inverse(decompositions["F"].matrix, damping)
        return _apply(inverse, gradient)

    def batch_key(self) -> Hashable:
        return (ScaleShiftBlock, self.dim)

    @classmethod
    def operator(
        cls,
        blocks: Sequence[CurvatureBlock],
        decompositions: Sequence[BlockDecompositions],
        damping: float,
        method: str,
    ) -> Operator:
        """Every block of one ``dim``: their damped inverses stacked once, one batched
        product per step."""
        inverse = damped_inverse(torch.cat([d["F"].matrix for d in decompositions]), damping)
        counts = [block.elements for block in blocks]

        def apply(gradients: Sequence[Tensor]) -> list[Tensor]:
            return list(_apply(inverse, torch.cat(list(gradients))).split(counts))

        return apply


def damped_inverse(matrices: Tensor, damping: float) -> Tensor:
    """``(F + damping I)^-1`` of each ``2 x 2`` or ``1 x 1`` symmetric PSD ``F`` in closed form.

    Computed in float64 (where the device has it) and returned in the input dtype. The
    determinant is ``max(det F, 0) + damping tr F + damping**2``, positive for any
    ``damping > 0`` even when round-off makes ``F`` slightly indefinite.

    Args:
        matrices: ``(elements, d, d)`` with ``d`` 1 or 2.
    """
    dtype = matrices.dtype
    wide = matrices if matrices.device.type == "mps" else matrices.double()
    if wide.shape[-1] == 1:
        return (wide.clamp_min(0.0) + damping).reciprocal().to(dtype)
    a = wide[:, 0, 0].clamp_min(0.0)
    d = wide[:, 1, 1].clamp_min(0.0)
    b = 0.5 * (wide[:, 0, 1] + wide[:, 1, 0])
    det = (a * d - b * b).clamp_min(0.0) + damping * (a + d) + damping**2
    first = torch.stack([d + damping, -b], dim=-1)
    second = torch.stack([-b, a + damping], dim=-1)
    return (torch.stack([first, second], dim=-2) / det.reshape(-1, 1, 1)).to(dtype)


def _apply(inverse: Tensor, gradient: Tensor) -> Tensor:
    work = gradient.to(inverse.dtype).unsqueeze(-1)
    return (inverse @ work).squeeze(-1).to(gradient.dtype)


# -- layer geometries ------------------------------------------------------------------------


class _TrailingElements(ScaleShiftBlock):
    """Affine elements are the trailing ``normalized_shape`` dimensions; every leading
    dimension but the batch one is a position.

    The batch dimension is dimension 0 if its size is N (the ``examples`` of the pass),
    else dimension 1 if that one's is (sequence-first ``(T, N, d)`` input, as inside
    ``nn.TransformerEncoderLayer(batch_first=False)``), else dimension 0 (a call on part of
    the batch: a chunked or looped forward). When both sizes are N (``T == N``) dimension
    0 is taken: a sequence-first input with as many positions as examples is then read
    batch-first (its factors sum the wrong positions together).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.normalized_dims = len(tuple(module.normalized_shape))

    def layout(self, x: Tensor, examples: int) -> Hashable:
        leading = x.dim() - self.normalized_dims
        if leading == 0:
            return None  # unbatched: one example
        if x.shape[0] != examples and leading >= 2 and x.shape[1] == examples:
            return 1
        return 0

    def per_example(self, t: Tensor, layout: Hashable) -> Tensor:
        if layout is None:
            return t.reshape(1, 1, self.elements)
        if layout:
            t = t.movedim(layout, 0)
        return t.reshape(t.shape[0], -1, self.elements)

    def _dims(self) -> tuple[int, ...]:
        return tuple(range(-self.normalized_dims, 0))


class LayerNormBlock(_TrailingElements):
    """``nn.LayerNorm``: ``x-hat = (x - mean) / sqrt(var + eps)`` over ``normalized_shape``
    (biased variance, as torch), each element of it its own block."""

    def normalize(self, x: Tensor) -> Tensor:
        dims = self._dims()
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)


class RMSNormBlock(_TrailingElements):
    """``nn.RMSNorm``: ``x-hat = x / sqrt(mean(x**2) + eps)`` over ``normalized_shape``.

    ``eps=None`` is what torch uses: the machine epsilon of the computation's dtype, float64
    for float64 inputs and float32 otherwise (half-precision inputs are computed in float32);
    the input's dtype is taken to be the weight's.
    """

    def normalize(self, x: Tensor) -> Tensor:
        eps = self.module.eps
        if eps is None:
            wide = self.module.weight.dtype == torch.float64
            eps = torch.finfo(torch.float64 if wide else torch.float32).eps
        return x * torch.rsqrt(x.pow(2).mean(dim=self._dims(), keepdim=True) + eps)


class _ChannelElements(ScaleShiftBlock):
    """Affine elements are the channels of an ``(N, C, *spatial)`` input; the spatial
    locations are the positions. The batch dimension is always 0."""

    def layout(self, x: Tensor, examples: int) -> Hashable:
        return 0

    def per_example(self, t: Tensor, layout: Hashable) -> Tensor:
        return t.reshape(t.shape[0], self.elements, -1).transpose(1, 2)


class GroupNormBlock(_ChannelElements):
    """``nn.GroupNorm``: statistics per example and group of channels; one block per
    channel."""

    def normalize(self, x: Tensor) -> Tensor:
        groups = x.reshape(x.shape[0], self.module.num_groups, -1)
        var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
        return ((groups - mean) * torch.rsqrt(var + self.module.eps)).reshape(x.shape)


class BatchNormBlock(_ChannelElements):
    """``nn.BatchNorm1d/2d/3d``: in training mode (or without running statistics) the
    batch statistics of the call, treated as constants (an approximation: they couple the
    examples); in eval mode the running statistics (exact). One block per channel."""

    def normalize(self, x: Tensor) -> Tensor:
        module = self.module
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if module.training or module.running_mean is None or module.running_var is None:
            dims = (0, *range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        else:
            mean = module.running_mean.to(x.dtype).reshape(shape)
            var = module.running_var.to(x.dtype).reshape(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)
