"""Typed state of the K-FAC engine, and the checkpoint format with its upgrades."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_kfac.decomposition import Decomposition

#: The checkpoint format ``KFACEngine.state_dict`` writes.
FORMAT = 2

#: ``{block name: {factor key: tensor}}``.
Factors = dict[str, dict[str, Tensor]]
#: ``{block name: {factor key: decomposition, or None where it failed}}``.
Decompositions = dict[str, dict[str, Decomposition | None]]


@dataclass
class BlockState:
    """One block's state.

    Attributes:
        running: the running averages of its factors (empty until the first update).
        decomposed: the global factors its decompositions were computed from (what a
            checkpoint saves instead of the decompositions).
        decompositions: the decompositions in use; a key is absent until one succeeds, and a
            failed decomposition keeps the previous one.
    """

    running: dict[str, Tensor] = field(default_factory=dict)
    decomposed: dict[str, Tensor] = field(default_factory=dict)
    decompositions: dict[str, Decomposition] = field(default_factory=dict)


@dataclass
class PendingDecomposition:
    """Decompositions started in the background at ``origin_step`` from ``factors`` (the
    global factors of that step), installed at ``install_step``."""

    origin_step: int
    install_step: int
    factors: Factors
    future: Future | None = None


def upgrade(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` in the current format.

    Format 1 (lightning-kfac 0.1.0) kept one ``(A, G)`` pair per layer and one step counter;
    it becomes format 2 with the pair under the keys ``"A"`` and ``"G"`` and the counter as
    that of the first optimizer.

    Raises:
        ValueError: for a format this version cannot read, naming both versions.
    """
    version = state.get("format")
    if version == FORMAT:
        return dict(state)
    if version != 1:
        raise ValueError(
            f"K-FAC: the checkpoint's K-FAC state has format {version!r}; this version of "
            f"lightning-kfac reads formats 1 and {FORMAT}. Resume with the version that wrote "
            "it, or start K-FAC afresh without its callback state."
        )
    pending = state["pending"]
    return {
        **state,
        "format": FORMAT,
        "layers": {
            name: {"kind": None, "factors": {"A": shapes[0], "G": shapes[1]}}
            for name, shapes in state["layers"].items()
        },
        "optimizer_steps": {0: int(state["steps"])},
        "pending": []
        if pending is None
        else [
            {
                "optimizer": 0,
                "origin_step": pending["origin_step"],
                "install_step": pending["install_step"],
                "factors": pending["factors"],
            }
        ],
    }
