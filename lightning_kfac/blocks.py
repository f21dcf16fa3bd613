"""The layer types K-FAC supports out of the box: Linear and Conv1d/2d/3d (KFC).

Each is a ``KroneckerBlock`` that only says how the layer's input becomes rows ``a`` and
its output gradient rows ``g``; the math is the Kronecker block's.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.curvature import KroneckerBlock


class LinearBlock(KroneckerBlock):
    """``nn.Linear`` on input ``(N, ..., d_in)``: every leading position is a row."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self.groups = 1
        self.in_features = module.in_features
        self.out_features = module.out_features

    def example_major(self, x: Tensor, examples: int) -> Tensor:
        """A sequence-first ``(T, N, d)`` tensor (torch's recurrent and transformer layout
        with ``batch_first=False``) as ``(N, T, d)``; anything else as it is."""
        if x.dim() >= 3 and x.shape[0] != examples and x.shape[1] == examples:
            return x.transpose(0, 1)
        return x

    def stacked_geometry(self, x: Tensor) -> Hashable | None:
        return ()

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1, self.in_features)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(1, -1, self.out_features)


class ConvBlock(KroneckerBlock):
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

    def stacked_geometry(self, x: Tensor) -> Hashable | None:
        if x.dim() != len(self.kernel_size) + 2:  # unbatched: stacked inputs would not unfold
            return None
        return (self.kernel_size, self.stride, self.dilation, self.pad, self.pad_mode)

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
