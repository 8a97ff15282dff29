"""Figures of the benchmarks: matplotlib without a display, and saving a figure where its path says."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (PNG files, no display needed); imported here, when a plot is asked for."""
    # lazy: matplotlib is optional (the GPU check's wheelhouse leaves it out) and only plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Write the figure (making its folder) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
