"""The benchmarks' plots: one way to write a figure beside its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, plot_dir: Path, stem: str) -> str:
    """Lay out ``fig``, write it as ``<stem>.png`` in ``plot_dir``, close it.

    Returns
    -------
    str
        The file's name (what the markdown beside it links to).
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = plot_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
