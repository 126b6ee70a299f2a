"""Figures built from long-form frames; callers save them.

Figures are made as `matplotlib.figure.Figure` objects, never through pyplot: no display, no global
state, and `savefig` renders PNGs with Agg by itself.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator


def _title(figure: Figure, title: str) -> None:
    """The figure's title over its whole width, wrapped to fit it (never cut at an edge)."""
    figure.suptitle(textwrap.fill(title, max(40, int(figure.get_figwidth() * 12))), fontsize=9)


def calib_snr_per_layer(stats: pl.DataFrame, title: str) -> Figure:
    """In-sample SNR (dB) of every pruned linear on its calibration tokens, by layer, one line per module."""

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for module in sorted(stats["module"].unique()):
        rows = stats.filter(stats["module"] == module).sort("layer")
        axes.plot(rows["layer"], rows["calib_snr_db"], marker="o", markersize=3, label=module)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("SNR of the pruned output on the calibration tokens (dB)")
    _title(figure, title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    return figure


def iou_heatmap(
    iou: pl.DataFrame, title: str, value: str = "iou", label: str = "mean IoU of pruned weights"
) -> Figure:
    """Mean IoU (or another pairwise `value`) over language pairs, layer (rows) x module (columns)."""

    mean = iou.group_by("layer", "module").agg(pl.col(value).mean()).sort("layer", "module")
    wide = mean.pivot(on="module", index="layer", values=value).sort("layer")
    modules = [column for column in wide.columns if column != "layer"]
    values = wide.select(modules).to_numpy()
    figure = Figure(figsize=(1.2 * len(modules) + 2, 0.3 * wide.height + 2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(wide.height), wide["layer"].to_list(), fontsize=7)
    axes.set_ylabel("decoder layer")
    _title(figure, title)
    figure.colorbar(image, ax=axes, label=label)
    return figure


def language_matrix(matrix: pl.DataFrame, value: str, title: str) -> Figure:
    """A symmetric language x language matrix from a long (lang_a, lang_b, value) table."""

    langs = sorted(set(matrix["lang_a"]) | set(matrix["lang_b"]))
    grid = np.eye(len(langs))
    for lang_a, lang_b, score in matrix.select("lang_a", "lang_b", value).iter_rows():
        i, j = langs.index(lang_a), langs.index(lang_b)
        grid[i, j] = grid[j, i] = score
    figure = Figure(figsize=(1 + 0.7 * len(langs), 0.6 + 0.7 * len(langs)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="viridis")
    axes.set_xticks(range(len(langs)), langs)
    axes.set_yticks(range(len(langs)), langs)
    for i in range(len(langs)):
        for j in range(len(langs)):
            axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    _title(figure, title)
    figure.colorbar(image, ax=axes)
    return figure


def layer_lines(frame: pl.DataFrame, value: str, hue: str, title: str, ylabel: str) -> Figure:
    """`value` against the decoder layer, one line per `hue` value (averaged over any other column)."""

    mean = frame.group_by(hue, "layer").agg(pl.col(value).mean()).sort(hue, "layer")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for key in sorted(mean[hue].unique().to_list()):
        rows = mean.filter(pl.col(hue) == key)
        axes.plot(rows["layer"], rows[value], marker="o", markersize=3, label=f"{hue}={key}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel(ylabel)
    _title(figure, title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncols=2)
    return figure


def matrix_heatmap(
    frame: pl.DataFrame,
    row: str,
    column: str,
    value: str,
    title: str,
    best: str | None = "max",
    relative: bool = False,
    starred: set[tuple[str, str]] | None = None,
) -> Figure:
    """A row x column heatmap of `value` (mean over other columns) with numbers in the cells.

    Cells whose row and column labels are equal (calibration language = evaluation language) get a
    red box; the `starred` (row, column) cells get a star, by default every cell holding its
    column's best value (`best`: "max" or "min"; ties all starred). With `relative` the colours show
    each cell against its column's best (value / best), so columns on different scales
    (perplexities of different languages) read alike; the numbers stay the values. The title spans
    the figure, wrapped to its width.
    """

    mean = frame.group_by(row, column).agg(pl.col(value).mean())
    rows = sorted(mean[row].unique().to_list())
    columns = sorted(mean[column].unique().to_list())
    grid = np.full((len(rows), len(columns)), np.nan)
    for r, c, score in mean.select(row, column, value).iter_rows():
        grid[rows.index(r), columns.index(c)] = score
    figure = Figure(figsize=(2.4 + 0.8 * len(columns), 1.2 + 0.6 * len(rows)), layout="constrained")
    axes = figure.add_subplot()
    colours, label = grid, value
    if relative:
        reference = np.nanmax(grid, axis=0) if best == "max" else np.nanmin(grid, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            colours = grid / reference
        label = f"{value} / best of the column"
    image = axes.imshow(colours, cmap="viridis_r" if relative and best == "min" else "viridis", aspect="auto")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [str(r) for r in rows])
    axes.set_xlabel(column)
    axes.set_ylabel(row)
    if starred is None and best in ("max", "min"):
        column_best = np.nanmax(grid, axis=0) if best == "max" else np.nanmin(grid, axis=0)
        starred = {
            (str(rows[i]), str(columns[j])) for i, j in zip(*np.nonzero(grid == column_best), strict=True)
        }
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isnan(grid[i, j]):
                continue
            star = "*" if (str(rows[i]), str(columns[j])) in (starred or set()) else ""
            red, green, blue, _ = image.cmap(image.norm(colours[i, j]))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"
            number = f"{grid[i, j]:.0f}" if abs(grid[i, j]) >= 1000 else f"{grid[i, j]:.3g}"
            axes.text(j, i, f"{number}{star}", ha="center", va="center", fontsize=7, color=ink)
            if str(rows[i]) == str(columns[j]):
                axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    _title(figure, title)
    figure.colorbar(image, ax=axes, label=label)
    return figure


def group_figures(frames: Mapping[str, pl.DataFrame], vary: str, name: str) -> dict[str, Figure]:
    """The plots of an analysis run, from whichever of its tables it has."""
    figures = {}
    if not frames["iou"].is_empty():  # (a quantization method prunes nothing: no masks to compare)
        figures["iou_heatmap"] = iou_heatmap(frames["iou"], f"mask IoU across {vary} — {name}")
        figures["iou_languages"] = language_matrix(frames["iou_pairs"], "iou", f"mean mask IoU by {vary}")
    if "code_agreement" in frames:
        codes = frames["code_agreement"]
        figures["code_agreement_heatmap"] = iou_heatmap(
            codes, f"quantization codes equal across {vary} — {name}", "agreement", "share of equal codes"
        )
        pairs = codes.group_by("lang_a", "lang_b").agg(pl.col("agreement").mean())
        figures["code_agreement_languages"] = language_matrix(
            pairs, "agreement", f"share of equal quantization codes by {vary}"
        )
    figures |= {
        "calib_snr_by_calib": layer_lines(
            frames["calib_snr"],
            "calib_snr_db",
            vary,
            f"in-sample pruning SNR per layer by {vary} (each run on its own calibration tokens)",
            "mean SNR on the calibration tokens (dB)",
        ),
    }
    if "cross_snr" in frames:
        cross = frames["cross_snr"]
        figures["cross_snr"] = matrix_heatmap(
            cross, vary, "eval_lang", "snr_db", "hidden-state SNR vs dense, mean over layers (dB)"
        )
        for lang in sorted(cross["eval_lang"].unique()):
            figures[f"cross_snr_layers_{lang}"] = layer_lines(
                cross.filter(pl.col("eval_lang") == lang),
                "snr_db",
                vary,
                f"hidden-state SNR vs dense on {lang} held-out text",
                "SNR (dB)",
            )
        counts = frames["lape_counts"]
        for model in counts["model"].unique().sort():
            figures[f"lape_counts_{model}"] = layer_lines(
                counts.filter(pl.col("model") == model),
                "neurons",
                "lang",
                f"language-specific neurons (LAPE) per layer — {model}",
                "neurons",
            )
        figures["lape_overlap"] = matrix_heatmap(
            frames["lape_overlap"], vary, "lang", "overlap", "LAPE neuron overlap with the dense model"
        )
        figures["lsar_specific_share"] = layer_lines(
            frames["lsar"],
            "specific_share",
            vary,
            "share of the hidden-state deviation in the language-specific subspace (LSAR)",
            "specific / total deviation",
        )
    return figures


def owl_allocation(layers: pl.DataFrame, uniform: float | None, title: str) -> Figure:
    """OWL's allocated sparsity per decoder layer, one line per calibration language (a long
    (lang, layer, sparsity) frame), with the uniform target every layer would get as a dashed line."""

    figure = layer_lines(layers, "sparsity", "lang", title, "allocated sparsity (OWL)")
    axes = figure.axes[0]
    if uniform is not None:
        axes.axhline(uniform, color="grey", linestyle="--", linewidth=1, label=f"uniform {uniform:g}")
        axes.legend(fontsize=7, ncols=2)
    return figure


def removed_layers_grid(grid: pl.DataFrame, title: str, row_label: str = "calibration language") -> Figure:
    """Removed decoder layers: language (rows) x layer (columns), a filled cell where the language's
    run removed the layer (a long (lang, layer, removed) frame); each column headed by how many
    languages remove it."""

    langs = sorted(grid["lang"].unique().to_list())
    layers = sorted(grid["layer"].unique().to_list())
    cells = np.zeros((len(langs), len(layers)))
    for lang, layer, removed in grid.select("lang", "layer", "removed").iter_rows():
        cells[langs.index(lang), layers.index(layer)] = float(removed)
    figure = Figure(figsize=(max(6.0, 2 + 0.3 * len(layers)), 1.6 + 0.35 * len(langs)), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(cells, cmap="Greys", vmin=0, vmax=1.25, aspect="auto")
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    axes.set_yticks(range(len(langs)), langs, fontsize=8)
    axes.set_xticks(np.arange(len(layers) + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(len(langs) + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="lightgrey", linewidth=0.5)
    axes.tick_params(which="minor", length=0)
    top = axes.secondary_xaxis("top")
    top.set_xticks(range(len(layers)), [f"{int(count):d}" for count in cells.sum(axis=0)], fontsize=6)
    top.set_xlabel("languages removing the layer", fontsize=7)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel(row_label)
    _title(figure, title)
    return figure


def layer_plan_figures(
    frames: Mapping[str, pl.DataFrame], vary: str, name: str, uniform: float | None = None
) -> dict[str, Figure]:
    """The layer-plan plots of an analysis run, from whichever of `owl_layers` and `removed_layers`
    (`cps.analysis.layer_plans`) it has; `uniform`: the sparsity every layer would get without OWL."""
    figures = {}
    if "owl_layers" in frames:
        title = f"OWL allocated sparsity per layer by {vary} — {name}"
        figures["owl_allocation"] = owl_allocation(frames["owl_layers"], uniform, title)
    if "removed_layers" in frames:
        title = f"removed decoder layers by {vary} — {name}"
        figures["removed_layers"] = removed_layers_grid(frames["removed_layers"], title, vary)
    return figures
