"""Figure plumbing shared by every plot: a pyplot-free matplotlib figure and an atomic PNG write.

What it is: `new_figure(width, height)` (Agg canvas, no global pyplot state) and
`save_figure_atomic(fig, path)` (temporary file in the same directory, then `os.replace`). What it
is not: any drawing (`probe.plots`, `probe.metrics.frontier_plots`, `probe.sae.plots`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG to `path` via a temporary file and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a figure is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
