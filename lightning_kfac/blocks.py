"""Curvature blocks: how one layer type maps to Kronecker factors.

A block knows the geometry of its layer and nothing else: how to turn the layer's input
into rows ``a`` and its output gradient into rows ``g``, and how to read and write the
combined gradient matrix ``V = grad [W | b]``. Every quantity carries a leading *groups*
dimension (1 for ordinary layers), so grouped convolutions get one ``(A, G)`` pair per group
through the same code. A new layer type is one new subclass registered in ``BLOCK_TYPES``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerBlock(ABC):
    """The K-FAC view of one layer.

    Attributes:
        module: the layer.
        groups: number of independent ``(A, G)`` pairs.
        has_bias: whether the bias is part of the combined parameter ``[W | b]``.
        in_features: per-group input width without the homogeneous coordinate.
        out_features: per-group output width.
    """

    module: nn.Module
    groups: int
    has_bias: bool
    in_features: int
    out_features: int

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        bias = getattr(module, "bias", None)
        self.has_bias = bias is not None and bias.requires_grad

    @property
    def a_dim(self) -> int:
        """Side of the input factor ``A`` (``in_features + 1`` with a bias)."""
        return self.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        """Side of the output-gradient factor ``G``."""
        return self.out_features

    def factor_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of ``A`` and ``G``: ``(groups, a_dim, a_dim)`` and ``(groups, g_dim, g_dim)``."""
        return (self.groups, self.a_dim, self.a_dim), (self.groups, self.g_dim, self.g_dim)

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a`` from the layer input ``x``: ``(groups, rows, in_features)``."""

    @abstractmethod
    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Rows ``g`` from the output gradient: ``(groups, rows, out_features)``."""

    def gradient(self) -> Tensor | None:
        """The combined gradient ``V``: ``(groups, g_dim, a_dim)``, or None without a gradient."""
        weight_grad = self.module.weight.grad
        if weight_grad is None:
            return None
        matrix = weight_grad.reshape(self.groups, self.out_features, self.in_features)
        if not self.has_bias:
            return matrix
        bias_grad = self.module.bias.grad
        if bias_grad is None:
            bias_grad = torch.zeros_like(self.module.bias)
        return torch.cat([matrix, bias_grad.reshape(self.groups, self.out_features, 1)], dim=-1)

    def set_gradient(self, matrix: Tensor) -> None:
        """Write ``matrix`` (``(groups, g_dim, a_dim)``) back into the parameters' ``.grad``."""
        weight = self.module.weight
        weight.grad.copy_(matrix[..., : self.in_features].reshape(weight.shape))
        if self.has_bias and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(matrix[..., self.in_features].reshape(-1))

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this block preconditions."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])


class LinearBlock(LayerBlock):
    """``nn.Linear`` on input ``(N, ..., d_in)``: every leading position is a row."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self.groups = 1
        self.in_features = module.in_features
        self.out_features = module.out_features

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1, self.in_features)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(1, -1, self.out_features)


class ConvBlock(LayerBlock):
    """``nn.Conv1d/2d/3d`` (KFC): rows are unfolded patches, one per output location.

    Supports any stride, dilation and groups, integer, tuple, ``'same'`` and ``'valid'``
    padding, and every padding mode.
    """

    def __init__(self, module: nn.modules.conv._ConvNd) -> None:
        super().__init__(module)
        if module.transposed:
            raise TypeError("transposed convolutions are not supported")
        self.groups = module.groups
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.channels_per_group = module.in_channels // module.groups
        self.in_features = self.channels_per_group * math.prod(self.kernel_size)
        self.out_features = module.out_channels // module.groups
        self.pad = _reversed_padding(module.padding, self.kernel_size, self.dilation)
        self.pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def input_rows(self, x: Tensor) -> Tensor:
        spatial = len(self.kernel_size)
        if x.dim() == spatial + 1:  # unbatched input
            x = x.unsqueeze(0)
        if any(self.pad):
            x = F.pad(x, self.pad, mode=self.pad_mode)
        for dim, (k, s, d) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]
        # x: (N, C, *out_locations, *kernel) -> (groups, N * locations, C/groups * prod(kernel))
        x = x.movedim(1, 1 + spatial)  # (N, *out, C, *kernel)
        x = x.reshape(-1, self.groups, self.in_features)
        return x.transpose(0, 1)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == len(self.kernel_size) + 1:
            grad_output = grad_output.unsqueeze(0)
        rows = grad_output.movedim(1, -1).reshape(-1, self.groups, self.out_features)
        return rows.transpose(0, 1)


def _reversed_padding(
    padding: str | tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """Padding in ``F.pad`` order (last dimension first, ``(left, right)`` pairs).

    ``'same'`` puts the odd extra element on the right, as ``torch.nn.functional.conv*`` does.
    """
    if padding == "valid":
        return (0,) * (2 * len(kernel_size))
    pairs = []
    for i, (k, d) in enumerate(zip(kernel_size, dilation)):
        if padding == "same":
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
        else:
            pairs.append((padding[i], padding[i]))
    return tuple(p for pair in reversed(pairs) for p in pair)


BLOCK_TYPES: dict[type[nn.Module], type[LayerBlock]] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: ConvBlock,
    nn.Conv2d: ConvBlock,
    nn.Conv3d: ConvBlock,
}


def block_type_for(module: nn.Module) -> type[LayerBlock] | None:
    """The block class for ``module``, or None if unsupported.

    A subclass of a supported layer qualifies only if it keeps the base class's ``forward``:
    one that overrides it may compute something the block cannot see.
    """
    for base, block_type in BLOCK_TYPES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return block_type
    return None
