"""Hooks that collect one batch's Kronecker factors (reference, section 2).

The layer input is taken by a forward hook, the output gradient by a tensor hook on the
layer's output (unlike ``register_full_backward_hook``, this works when an in-place
activation such as ``ReLU(inplace=True)`` follows the layer). Hooks do work only while the
capture is armed, in the factor dtype with autocast disabled, and every call of a module in
one forward pass contributes its rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_kfac.blocks import LayerBlock

#: What the loss was multiplied by before backward: a number, a tensor, or a callable read
#: during backward (a GradScaler creates its scale tensor lazily, in its first ``scale``).
LossScale = float | Tensor | Callable[[], float | Tensor]


@dataclass
class BatchFactors:
    """One batch's factors for one block.

    Attributes:
        A: ``(groups, a_dim, a_dim)``, the mean of ``a a^T`` over rows.
        G: ``(groups, g_dim, g_dim)``, ``(1/N) sum g-hat g-hat^T``.
        examples: N, the number of examples the batch held.
    """

    A: Tensor
    G: Tensor
    examples: int


class _Sums:
    """Running sums for one block within one factor batch."""

    def __init__(self) -> None:
        self.a_sum: Tensor | None = None
        self.rows = 0
        self.g_sum: Tensor | None = None
        self.examples = 0


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


def _full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """No autograd recording, and autocast off where it is on (entering an autocast context
    costs host time on every hook call, so it is skipped when there is nothing to undo)."""
    if torch.is_autocast_enabled(device_type):
        return _no_grad_no_autocast(device_type)
    return torch.no_grad()


@contextlib.contextmanager
def _no_grad_no_autocast(device_type: str):
    with torch.autocast(device_type, enabled=False), torch.no_grad():
        yield


class FactorCapture:
    """Forward and tensor hooks that accumulate batch factors for a set of blocks.

    Args:
        blocks: ``{module name: block}``.
        loss_reduction: ``"mean"`` (g-hat = N g) or ``"sum"`` (g-hat = g).
        dtype: dtype the factors are computed in.
    """

    def __init__(
        self, blocks: Mapping[str, LayerBlock], *, loss_reduction: str, dtype: torch.dtype
    ) -> None:
        self.blocks = dict(blocks)
        self.loss_reduction = loss_reduction
        self.dtype = dtype
        self.armed = False
        self._loss_scale: LossScale = 1.0
        self._sums = {name: _Sums() for name in self.blocks}
        self._counted: set[str] = set()
        self._handles: list[RemovableHandle] = []
        #: Host seconds spent inside the hooks since the last ``pop`` (on a GPU this is the
        #: time to launch the kernels, not to run them).
        self.seconds = 0.0

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, block in self.blocks.items():
            hook = self._forward_hook(name, block)
            self._handles.append(block.module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook and disarm."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.armed = False

    def start_microbatch(self, loss_scale: LossScale = 1.0) -> None:
        """Arm the hooks for one forward/backward pass.

        Args:
            loss_scale: factor the loss was multiplied by before backward (``1/k`` under
                gradient accumulation over k micro-batches, times a GradScaler's scale); the
                output gradients are divided by it.
        """
        self.armed = True
        self._loss_scale = loss_scale
        self._counted.clear()

    def stop(self) -> None:
        """Disarm the hooks; what was accumulated stays until ``pop``."""
        self.armed = False

    def pop(self) -> dict[str, BatchFactors]:
        """The accumulated batch factors of every block that saw both passes; resets the sums."""
        result = {}
        for name, sums in self._sums.items():
            if sums.a_sum is not None and sums.g_sum is not None and sums.examples > 0:
                result[name] = BatchFactors(
                    A=sums.a_sum / sums.rows, G=sums.g_sum / sums.examples, examples=sums.examples
                )
        self._sums = {name: _Sums() for name in self.blocks}
        self.seconds = 0.0
        return result

    def _forward_hook(self, name: str, block: LayerBlock):
        def hook(module, args, kwargs, output) -> None:
            if not self.armed or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if not output.requires_grad:
                return
            start = time.perf_counter()
            x = args[0] if args else next(iter(kwargs.values()))
            batch_size = x.shape[0] if x.dim() > 1 else 1
            with _full_precision(x.device.type):
                rows = block.input_rows(x.detach().to(self.dtype))
                sums = self._sums[name]
                contribution = gram(rows, block.has_bias)
                sums.a_sum = contribution if sums.a_sum is None else sums.a_sum + contribution
                sums.rows += rows.shape[1]
            if name not in self._counted:
                self._counted.add(name)
                sums.examples += batch_size
            output.register_hook(self._gradient_hook(name, block, batch_size, self._loss_scale))
            self.seconds += time.perf_counter() - start

        return hook

    def _gradient_hook(self, name: str, block: LayerBlock, batch_size: int, loss_scale: LossScale):
        per_example = batch_size if self.loss_reduction == "mean" else 1

        def hook(grad: Tensor) -> None:
            start = time.perf_counter()
            scale = loss_scale() if callable(loss_scale) else loss_scale
            with _full_precision(grad.device.type):
                rows = block.output_rows(grad.to(self.dtype))
                contribution = (rows.mT @ rows) * (per_example / scale) ** 2
                sums = self._sums[name]
                sums.g_sum = contribution if sums.g_sum is None else sums.g_sum + contribution
            self.seconds += time.perf_counter() - start

        return hook
