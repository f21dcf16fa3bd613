"""Deterministic load balancing of decompositions over ranks."""

from __future__ import annotations

from collections.abc import Hashable, Mapping


def greedy_assignment(costs: Mapping[Hashable, float], world_size: int) -> dict[Hashable, int]:
    """Assign each unit of work to one rank: largest first, to the least-loaded rank.

    Deterministic: ties in cost keep the mapping's order, ties in load go to the lowest rank,
    so every rank computes the same assignment without communicating.

    Args:
        costs: ``{unit: cost}`` (for an eigendecomposition, ``groups * d**3``).
        world_size: number of ranks.

    Returns:
        ``{unit: rank}``.
    """
    order = sorted(enumerate(costs.items()), key=lambda item: (-item[1][1], item[0]))
    loads = [0.0] * world_size
    owners: dict[Hashable, int] = {}
    for _, (unit, cost) in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[unit] = rank
        loads[rank] += cost
    return owners
