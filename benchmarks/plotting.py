"""Shared plotting for the benchmark scripts: a headless pyplot and saving a figure."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: str, legend_below: bool = False) -> None:
    """Lay out ``figure``, write it to ``path`` (creating folders) and say where.

    With ``legend_below``, one legend of every labelled curve goes below the axes (inside
    them it hides the curves), with the axes laid out in the room above it.
    """
    rect = None
    if legend_below:
        figure.legend(loc="lower center", ncol=3, fontsize="small")
        rect = (0, 0.16, 1, 1)
    figure.tight_layout(rect=rect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"\nplot: {path}")
