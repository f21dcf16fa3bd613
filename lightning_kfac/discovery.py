"""Finding the layers K-FAC preconditions, and the summary table of what it found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from lightning_kfac.blocks import LayerBlock, block_type_for


@dataclass
class Skipped:
    """A module with parameters that K-FAC leaves with its plain gradient, and why."""

    name: str
    type_name: str
    reason: str


@dataclass
class Discovery:
    """The result of scanning a model."""

    blocks: dict[str, LayerBlock]
    skipped: list[Skipped]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def discover(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> Discovery:
    """Register every supported layer of ``model``.

    Args:
        model: the model; names are those of ``model.named_modules()``.
        include: glob patterns (``fnmatch``, e.g. ``"encoder.*"``); if given, only matching
            modules are registered.
        exclude: glob patterns of modules never registered.

    Returns:
        The registered blocks by module name, and the modules with parameters of their own
        that were skipped, with the reason.
    """
    blocks: dict[str, LayerBlock] = {}
    skipped: list[Skipped] = []
    for name, module in model.named_modules():
        own_parameters = list(module.parameters(recurse=False))
        if not own_parameters:
            continue
        type_name = type(module).__name__
        block_type = block_type_for(module)
        reason = None
        if block_type is None:
            reason = "unsupported layer type"
        elif include is not None and not _matches(name, include):
            reason = "not matched by include"
        elif _matches(name, exclude):
            reason = "matched by exclude"
        elif not any(p.requires_grad for p in own_parameters):
            reason = "all parameters frozen"
        elif not module.weight.requires_grad:
            reason = "weight frozen"
        if reason is None:
            try:
                blocks[name] = block_type(module)
            except TypeError as error:
                reason = str(error)
        if reason is not None:
            skipped.append(Skipped(name, type_name, reason))
    return Discovery(blocks, skipped)


def summary_table(discovery: Discovery) -> str:
    """A text table of the registered layers (name, type, factor shapes) and the skipped ones."""
    rows = [("", "Name", "Type", "A", "G")]
    for index, (name, block) in enumerate(discovery.blocks.items()):
        a_shape, g_shape = block.factor_shapes()
        groups = f"{a_shape[0]} x " if a_shape[0] > 1 else ""
        rows.append(
            (
                str(index),
                name,
                type(block.module).__name__,
                f"{groups}{a_shape[1]}x{a_shape[2]}",
                f"{groups}{g_shape[1]}x{g_shape[2]}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["K-FAC registered layers:"]
    lines += ["  " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if discovery.skipped:
        lines.append("K-FAC skipped (plain gradient):")
        lines += [f"  {s.name} ({s.type_name}): {s.reason}" for s in discovery.skipped]
    return "\n".join(lines)
