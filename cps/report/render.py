"""A report as text: one renderer per format, registered by name (`@renderer("markdown")`).

Cells read 'mean ± std (ci_low–ci_high)', the best of each column starred (`tables.best_rows`
decides which), the diagonal in [brackets]. `csv` is one table a CSV reader can read (the report's
first after the findings); `cps report --out` writes every table as a CSV of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from html import escape
from io import StringIO

from rich.console import Console
from rich.table import Table

from cps.errors import CpsError
from cps.report.tables import Report, Section, best_rows

Images = Mapping[int, list[str]]  # section index -> image paths shown below it
Renderer = Callable[[Report, Images], str]
RENDERERS: dict[str, Renderer] = {}

LEGEND = (
    "`*` best of the column; `[x]` calibrated on the language it is evaluated on; "
    "`(a–b)` Wilson 95% interval over the items."
)


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    def register(function: Renderer) -> Renderer:
        RENDERERS[name] = function
        return function

    return register


def check_format(fmt: str) -> None:
    if fmt not in RENDERERS:
        raise CpsError(f"unknown format {fmt!r}; use one of {', '.join(RENDERERS)}")


def render(report: Report, fmt: str, images: Images | None = None) -> str:
    check_format(fmt)
    return RENDERERS[fmt](report, images or {})


def number(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


def cell_text(row: Mapping[str, object], column: str) -> str:
    """'mean ± std (low–high)' of one value column in one row ('—' for a missing value)."""
    value = row[column]
    if not isinstance(value, float):
        return "—" if value is None else str(value)
    if math.isnan(value):
        return "—"
    text = number(value)
    std = row.get(f"{column}.std")
    if isinstance(std, float) and std > 0:
        text += f" ± {number(std)}"
    low, high = row.get(f"{column}.ci_low"), row.get(f"{column}.ci_high")
    if isinstance(low, float) and isinstance(high, float):
        text += f" ({number(low)}–{number(high)})"
    return text


def cells(section: Section) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of a section, best cells starred and diagonal cells bracketed."""
    frame = section.frame
    values = section.values
    best = best_rows(section)
    header = [*section.key, *(["n"] if "n" in frame.columns else []), *values]
    rows = []
    for index, row in enumerate(frame.iter_rows(named=True)):
        text = [str(row[k]) for k in section.key]
        if "n" in frame.columns:
            text.append(str(row["n"]))
        for column in values:
            cell = cell_text(row, column)
            if index in best.get(column, ()):
                cell += " *"
            if section.diagonal and str(row.get(section.diagonal)) == column:
                cell = f"[{cell}]"
            text.append(cell)
        rows.append(text)
    return header, rows


def linked(report: Report, section: Section, rows: list[list[str]], link: Callable[[str, str], str]) -> None:
    """Cells of the section's link columns (an anchor each) rewritten by `link(anchor, title)`."""
    titles = report.titles()
    header = [*section.key, *(["n"] if "n" in section.frame.columns else []), *section.values]
    for column in section.links:
        index = header.index(column)
        for row in rows:
            anchor = row[index]
            row[index] = link(anchor, titles[anchor]) if anchor in titles else "—"


@renderer("table")
def _text(report: Report, images: Images) -> str:
    buffer = StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    console.print(f"{report.runs} finished prune runs. {LEGEND.replace('`', '')}")
    for note in report.notes:
        console.print(note)
    for section in report.sections:
        header, rows = cells(section)
        linked(report, section, rows, lambda anchor, title: title)
        table = Table(title=section.title, caption=section.note or None)
        for column in header:
            table.add_column(column, justify="left" if column in section.key else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    return buffer.getvalue()


@renderer("markdown")
def _markdown(report: Report, images: Images) -> str:
    lines = [f"# cps report\n\n{report.runs} finished prune runs. {LEGEND}\n"]
    lines += [f"{note}\n" for note in report.notes]
    for index, section in enumerate(report.sections):
        header, rows = cells(section)
        linked(report, section, rows, lambda anchor, title: f"[{title}](#{anchor})")
        if section.anchor:
            lines.append(f'<a id="{section.anchor}"></a>\n')
        lines.append(f"## {section.title}\n")
        if section.note:
            lines.append(section.note.replace("\n", "  \n") + "\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += [f"\n![{section.title}]({image})" for image in images.get(index, [])]
        lines.append("")
    return "\n".join(lines)


@renderer("html")
def _html(report: Report, images: Images) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>cps report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
        "img{max-width:100%}</style>",
        f"<h1>cps report</h1><p>{report.runs} finished prune runs. {escape(LEGEND.replace('`', ''))}</p>",
    ]
    parts += [f"<p>{escape(note)}</p>" for note in report.notes]
    for index, section in enumerate(report.sections):
        header, rows = cells(section)
        rows = [[escape(c) for c in row] for row in rows]
        linked(report, section, rows, lambda anchor, title: f"<a href='#{anchor}'>{escape(title)}</a>")
        anchor = f" id='{escape(section.anchor)}'" if section.anchor else ""
        parts.append(f"<h2{anchor}>{escape(section.title)}</h2>")
        if section.note:
            parts.append("<p>" + "<br>".join(escape(line) for line in section.note.split("\n")) + "</p>")
        parts.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        for image in images.get(index, []):
            parts.append(f"<img src='{escape(image)}' alt='{escape(section.title)}'>")
    return "\n".join(parts)


@renderer("csv")
def _csv(report: Report, images: Images) -> str:
    return report.main.frame.write_csv() if report.sections else ""


@renderer("json")
def _json(report: Report, images: Images) -> str:
    return json.dumps(
        [{"title": s.title, "key": s.key, "rows": s.frame.to_dicts()} for s in report.sections],
        indent=1,
        default=str,
    )
