"""Running averages of curvature factors (reference, section 2)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_kfac.tiles import tile_runs, untile


def update_running(
    updates: Iterable[tuple[dict[str, Tensor], Mapping[str, Tensor]]], decay: float
) -> None:
    """``F <- decay * F + (1 - decay) * F_batch`` for every factor of many blocks at once; a
    factor seen for the first time copies its batch value.

    Uses two ``torch._foreach`` kernels for all factors rather than two ops per factor: on
    small layers the per-op host cost dominates. Batch factors that are the slices of one
    batched product are first copied as one tensor, so that the running factors are slices
    of one tensor too, and later updates of the same blocks are one op per product.

    Args:
        updates: ``(running factors of a block, its batch factors)`` pairs; the running
            dict is updated in place.
        decay: rho in ``[0, 1)``.
    """
    # by factor key, so that the slices of one batched product are consecutive
    by_key: dict[str, list[tuple[dict[str, Tensor], Tensor]]] = defaultdict(list)
    for factors, new in updates:
        for key, value in new.items():
            by_key[key].append((factors, value))
    running, batch = [], []
    first: list[tuple[dict[str, Tensor], str, Tensor]] = []
    for key, pairs in by_key.items():
        for factors, value in pairs:
            if key in factors:
                running.append(factors[key])
                batch.append(value)
            else:
                first.append((factors, key, value))
    _copy_first(first)
    if not running:
        return
    running_runs, batch_runs = tile_runs(running), tile_runs(batch)
    if [n for _, n in running_runs] == [n for _, n in batch_runs]:  # stacked alike
        running = [t for t, _ in running_runs]
        batch = [b.view(r.shape) for r, (b, _) in zip(running, batch_runs)]
    torch._foreach_mul_(running, decay)
    torch._foreach_add_(running, batch, alpha=1.0 - decay)


def _copy_first(first: list[tuple[dict[str, Tensor], str, Tensor]]) -> None:
    """Running factors seen for the first time: copies of their batch values, one copy per
    batched product they are slices of."""
    values = [value for *_, value in first]
    runs = tile_runs(values)
    for (factors, key, _), copy in zip(first, untile(values, runs, [t.clone() for t, _ in runs])):
        factors[key] = copy
