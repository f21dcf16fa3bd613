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
    run: list[Tensor] = []

    def close() -> None:
        base = run[0]._base
        if len(run) > 1 and sum(t.numel() for t in run) == base.numel():
            out.append((base, len(run)))
        else:
            out.extend((t, 1) for t in run)
        run.clear()

    for tensor in tensors:
        base = tensor._base
        if base is None and not run:  # the common case of a plain tensor, decided at once
            out.append((tensor, 1))
            continue
        if run and not (
            base is run[0]._base
            and tensor.shape == run[0].shape
            and tensor.is_contiguous()
            and tensor.storage_offset() == run[-1].storage_offset() + run[-1].numel()
        ):
            close()
        if run or (
            base is not None
            and base.is_contiguous()
            and tensor.is_contiguous()
            and tensor.storage_offset() == base.storage_offset()
        ):
            run.append(tensor)
        else:
            out.append((tensor, 1))
    if run:
        close()
    return out


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
