"""Tensors that are slices of one stacked tensor, seen as that tensor again.

Batched work across layers produces one tensor per shape group, and every layer gets a
view of it (``unbind``/``split`` along the leading dimension). On small layers a torch op
costs more host time than its arithmetic, so a later step that treats many layers alike
(an inner product, a scaling, a finiteness check, a stacked product) works on the stacked
tensors again instead of on one view per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def tile_runs(tensors: Sequence[Tensor]) -> list[tuple[Tensor, int]]:
    """``tensors`` with every run of consecutive, contiguous slices of one shape that
    together make up a whole contiguous tensor replaced by that tensor: a list of
    ``(tensor, how many of tensors it stands for)``. A run of ``count`` slices of shape ``s``
    is its tensor viewed as ``(count, *s)`` and unbound (``untile``).

    Flattening and concatenating the results gives the same elements, in the same order, as
    flattening and concatenating ``tensors``.

    Args:
        tensors: views (pieces of ``unbind`` or ``split`` along the leading dimension) or
            plain tensors, in any mix.
    """
    out: list[tuple[Tensor, int]] = []
    i, total = 0, len(tensors)
    while i < total:  # host time matters here: few tensor attribute reads per tensor
        count = _run_from(tensors, i)
        out.append((tensors[i]._base, count) if count > 1 else (tensors[i], 1))
        i += count
    return out


def _run_from(tensors: Sequence[Tensor], i: int) -> int:
    """How many tensors from ``i`` on make up ``tensors[i]``'s base whole (1 if they do
    not)."""
    first = tensors[i]
    base = first._base
    if base is None or not first.is_contiguous() or not base.is_contiguous():
        return 1
    start, size = first.storage_offset(), first.numel()
    whole = base.numel()
    if start != base.storage_offset() or not size or whole % size or whole // size < 2:
        return 1
    count = whole // size
    if i + count > len(tensors):
        return 1
    shape = first.shape
    for j in range(1, count):
        tensor = tensors[i + j]
        if (
            tensor._base is not base
            or tensor.storage_offset() != start + j * size
            or tensor.shape != shape
            or not tensor.is_contiguous()
        ):
            return 1
    return count


def untile(
    tensors: Sequence[Tensor], runs: Sequence[tuple[Tensor, int]], results: Sequence[Tensor]
) -> list[Tensor]:
    """One tensor per one of ``tensors``, shaped alike, from ``results``: one per run of
    ``tile_runs(tensors)``, shaped as its run's tensor (the result of an elementwise op on
    it, or a copy)."""
    out: list[Tensor] = []
    for (_, count), result in zip(runs, results):
        shape = tensors[len(out)].shape
        out += result.view(count, *shape).unbind(0) if count > 1 else [result]
    return out


def tiles(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors of ``tile_runs(tensors)``."""
    return [tensor for tensor, _ in tile_runs(tensors)]


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat(tensors)`` along the leading dimension, without a copy where they are
    the slices of one tensor (one tensor: itself)."""
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape[1:]
    if any(t.shape[1:] != shape for t in tensors):
        return torch.cat(list(tensors))  # which says what does not fit
    parts = [tile.view(-1, *shape) for tile in tiles(tensors)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
