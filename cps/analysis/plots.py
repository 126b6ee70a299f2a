"""Figures built from long-form frames; callers save them (matplotlib, no display needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure


def snr_per_layer(stats: pl.DataFrame, title: str) -> Figure:
    """SNR (dB) of every pruned linear against its layer index, one line per module."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for module in sorted(stats["module"].unique()):
        rows = stats.filter(stats["module"] == module).sort("layer")
        axes.plot(rows["layer"], rows["snr_db"], marker="o", markersize=3, label=module)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("SNR of the pruned output (dB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    return figure
