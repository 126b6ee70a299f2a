"""A report folder: report.md and report.html, a heatmap PNG per pivot table beside them, and every
table as a CSV file of its own."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from cps.analysis.plots import matrix_heatmap
from cps.report.render import render
from cps.report.tables import EVAL_LANG, Report, Section, best_rows

_ROW = "_row"


def heatmaps(section: Section) -> dict[str, Figure]:
    """A pivot section as heatmaps (rows = its key, columns = the pivoted values), the same cells
    starred as in the tables. With a diagonal column (calib_lang) and more key columns, one heatmap
    per value of the others, so the calibration language is the row and its diagonal is boxed."""
    values = section.values
    rows = [section.diagonal] if section.diagonal else section.key
    others = [k for k in section.key if k not in rows]
    best = best_rows(section)
    frame = section.frame.with_row_index(_ROW)
    if "method" in frame.columns and (frame["method"] != "dense").any():
        frame = frame.filter(pl.col("method") != "dense")  # the reference, not a calibration choice
    frame = frame.with_columns(
        pl.concat_str([pl.col(k).cast(pl.String) for k in others], separator=" ").alias("_part")
        if others
        else pl.lit("").alias("_part"),
        pl.concat_str([pl.col(k).cast(pl.String) for k in rows], separator=" / ").alias("_label"),
    )
    label = " / ".join(rows)
    relative = section.diagonal is not None and section.best == "min"  # ppl, bpb: scales differ
    figures = {}
    for part in sorted(frame["_part"].unique().to_list()):
        selected = frame.filter(pl.col("_part") == part)
        starred = {
            (name, column)
            for index, name in selected.select(_ROW, "_label").iter_rows()
            for column in values
            if index in best.get(column, ())
        }
        long = (
            selected.select(pl.col("_label").alias(label), *values)
            .unpivot(index=label, on=values, variable_name=EVAL_LANG, value_name="value")
            .drop_nulls("value")
        )
        if long.height:
            title = f"{section.title}" + (f" — {part}" if part else "")
            figures[part] = matrix_heatmap(
                long, label, EVAL_LANG, "value", title, section.best, relative, starred
            )
    return figures


def write_report(report: Report, folder: str | Path) -> list[Path]:
    """report.md and report.html with a heatmap PNG per pivot table beside them, and every table as CSV."""
    out = Path(folder)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    images: dict[int, list[str]] = {}
    written = []
    for index, section in enumerate(report.sections):
        slug = re.sub(r"[^a-z0-9]+", "_", section.title.lower()).strip("_")[:60] or f"table{index}"
        csv = out / f"{index:02d}_{slug}.csv"
        section.frame.write_csv(csv)
        written.append(csv)
        if section.heatmap and section.frame.height and section.values:
            pngs = []
            for part, figure in heatmaps(section).items():
                suffix = re.sub(r"[^a-z0-9]+", "_", part.lower()).strip("_")
                png = out / "plots" / f"{index:02d}_{slug}{'_' + suffix if suffix else ''}.png"
                figure.savefig(png, dpi=110)
                pngs.append(f"plots/{png.name}")
                written.append(out / pngs[-1])
            images[index] = pngs
    for name, fmt in (("report.md", "markdown"), ("report.html", "html")):
        (out / name).write_text(render(report, fmt, images), encoding="utf-8")
        written.append(out / name)
    return written
