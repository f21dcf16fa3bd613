"""Shared plotting for the benchmark scripts: a headless pyplot and saving a figure."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: str, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay out ``figure`` (within ``rect``, in figure fractions, where given: room left for
    a figure legend), write it to ``path`` (creating folders) and say where."""
    figure.tight_layout(rect=rect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"\nplot: {path}")
