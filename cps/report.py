"""`cps report`: comparison tables built straight from the tracking store.

Rows are the values of the `group_by` params. Runs are never averaged across models, methods,
patterns or sparsities: those of them that vary in the selection join the row key. Everything else
that varies (seeds, above all) is averaged: every number is a mean with its standard deviation over
the `n` runs of the row (std is 0 for a single run).

Sections:
- `metrics`: each selected metric family (`ppl`, `bpb`, `snr`, `acc`, ... as `<family>.<name>`) per
  row; `snr` is the held-out SNR of a pruned model's hidden states against the dense model's on
  each evaluation language (`snr_db.<lang>`), accuracies carry their Wilson 95% interval;
- with `pivot`: one table per metric family, `eval_lang` (the language a metric is named after)
  or any param as columns; for `calib_lang` x `eval_lang` the diagonal (calibrated on the language
  it is evaluated on) is marked, the best row of each column starred, and the change against the
  dense baseline of the same model (`method=dense`) is a table of its own;
- task accuracy by task family (rows) x language (columns);
- pruning SNR/error per row, and the analysis runs' IoU / LAPE / LSAR headlines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cps import tracking
from cps.errors import CpsError
from cps.metrics import INTERVAL, LANGUAGE_KINDS, LAYER, companion, kind_of, metric, metric_lang, task_family

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

SETTING_PARAMS = ("model", "method", "pattern", "sparsity")
FORMATS = ("table", "markdown", "csv", "json", "html")
EVAL_LANG = "eval_lang"
# Task families whose `acc` column shows acc_mutual_info (the task pack's metric to read for them).
MUTUAL_INFO_TASKS = ("flores_next",)
PRUNING_METRICS = ("m:calib_snr_db.mean", "m:calib_error.total", "m:sparsity.actual", "m:time.prune_s")
# Prune metrics logged before the in-sample figures were named for what they are.
LEGACY_METRICS = {"m:snr_db.mean": "m:calib_snr_db.mean", "m:prune_error.total": "m:calib_error.total"}
NOTES = {
    "ppl": "token perplexity on held-out text (each document alone, BOS first; lower is better)",
    "bpb": "bits per UTF-8 byte of the scored held-out text (comparable across tokenizers)",
    "snr": "held-out SNR (dB) of the pruned model's hidden states against the dense model's on each "
    "evaluation language's text, mean over layers; higher = closer to dense",
}


@dataclass(frozen=True)
class ReportConfig:
    group_by: tuple[str, ...] = ("calib_lang",)
    filters: tuple[tuple[str, str], ...] = ()
    metrics: tuple[str, ...] = ("ppl", "bpb", "acc")
    pivot: str | None = None
    include_dense: bool = True

    def __post_init__(self) -> None:
        if not self.group_by:
            raise CpsError("--group-by needs at least one param")
        if not self.metrics:
            raise CpsError("--metrics needs at least one metric family (ppl, bpb, acc, ...)")


@dataclass
class Section:
    """One table of the report: numbers in `frame`; `mean`/`std` column pairs render as 'm ± s'."""

    title: str
    frame: pl.DataFrame
    key: list[str]  # the row-label columns
    note: str = ""
    best: str | None = None  # "min" or "max": star the best row of each value column
    diagonal: str | None = None  # a key column whose value marks the diagonal cell of its column
    heatmap: bool = False


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)
    runs: int = 0


# ---------------------------------------------------------------------------------------------
# Reading the store


def _matches(record: tracking.RunRecord, filters: Mapping[str, str]) -> bool:
    """A filter names a param, or a tag `cps.<key>` (e.g. study=demo for a sweep's runs)."""
    for key, value in filters.items():
        actual = record.params.get(key, record.tags.get(f"cps.{key}"))
        if actual is None or str(actual) != value:
            return False
    return True


def prune_runs(store: tracking.Store, filters: Mapping[str, str]) -> pl.DataFrame:
    """Finished prune runs matching the filters: params and metrics as columns (metrics prefixed m:)."""
    import polars as pl

    rows = []
    for record in tracking.find_runs(store, "prune"):
        if not _matches(record, filters):
            continue
        row: dict[str, object] = {"run_id": record.run_id, **record.params}
        row |= {f"m:{name}": value for name, value in record.metrics.items()}
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    columns = sorted({key for row in rows for key in row})
    return pl.DataFrame(
        [{column: row.get(column) for column in columns} for row in rows],
        schema={c: pl.Float64 if c.startswith("m:") else pl.String for c in columns},
    )


def _families(frame: pl.DataFrame, families: tuple[str, ...]) -> dict[str, list[str]]:
    """Metric columns per family, e.g. ppl -> [ppl.ar, ppl.en, ...], snr -> [snr_db.ar, ...]
    (per-layer series excluded)."""
    found: dict[str, list[str]] = {}
    for family in families:
        kind = kind_of(family)
        columns = sorted(
            c
            for c in frame.columns
            if c.startswith(f"m:{kind}.")
            and not c.endswith(f".{LAYER}")
            and (kind not in LANGUAGE_KINDS or metric_lang(c.removeprefix("m:")) is not None)
        )
        if columns:
            found[family] = columns
    return found


def _lang(column: str) -> str | None:
    return metric_lang(column.removeprefix("m:"))


def _family(column: str) -> str:
    return task_family(column.removeprefix("m:"))


def _bound_column(column: str, bound: str) -> str:
    """m:acc.sib_sw -> m:acc_ci_low.sib_sw."""
    return "m:" + companion(column.removeprefix("m:"), bound)


# ---------------------------------------------------------------------------------------------
# Aggregation


def aggregate(frame: pl.DataFrame, key: list[str], values: list[str]) -> pl.DataFrame:
    """Mean and std (0 for one run) of `values` per `key`; `n` runs per row; sorted by key."""
    import polars as pl

    exprs = [pl.len().alias("n")]
    for column in values:
        name = column.removeprefix("m:")
        exprs += [pl.col(column).mean().alias(name), pl.col(column).std().fill_null(0.0).alias(f"{name}.std")]
    return frame.group_by(key).agg(exprs).sort(key)


def row_key(frame: pl.DataFrame, group_by: tuple[str, ...]) -> list[str]:
    """`group_by` plus the setting params that vary among the pruned runs (dense rows are told
    apart by `method` alone: their sparsity 0 and pattern never split the pruned rows)."""
    import polars as pl

    missing = [param for param in group_by if param not in frame.columns]
    if missing:
        known = ", ".join(sorted(c for c in frame.columns if not c.startswith("m:") and c != "run_id"))
        raise CpsError(f"no prune run has the param {missing[0]!r} to group by; params: {known}")
    pruned = frame.filter(pl.col("method") != "dense") if "method" in frame.columns else frame
    extra = [
        param
        for param in SETTING_PARAMS
        if param not in group_by
        and param in frame.columns
        and (pruned[param].n_unique() > 1 or (param == "method" and frame[param].n_unique() > 1))
    ]
    return [*extra, *group_by]


def build_report(store: tracking.Store, config: ReportConfig) -> Report:
    import polars as pl

    tracking.client(store)
    filters = dict(config.filters)
    runs = prune_runs(store, filters)
    if runs.is_empty():
        where = " ".join(f"{k}={v}" for k, v in config.filters) or "the store"
        raise CpsError(f"no finished prune runs in {where} ({store.resolved_uri})")
    for column in [c for c in runs.columns if c.startswith("m:acc_mutual_info.")]:
        task = column.removeprefix("m:acc_mutual_info.")
        if task_family(metric("acc", task)) in MUTUAL_INFO_TASKS:
            runs = runs.with_columns(pl.col(column).alias(f"m:acc.{task}"))
            for bound in INTERVAL:
                if _bound_column(column, bound) in runs.columns:
                    runs = runs.with_columns(
                        pl.col(_bound_column(column, bound)).alias(f"m:acc_{bound}.{task}")
                    )
    for old, new in LEGACY_METRICS.items():
        if old in runs.columns:
            merged = pl.coalesce(new, old) if new in runs.columns else pl.col(old)
            runs = runs.with_columns(merged.alias(new))
    dense = runs.filter(pl.col("method") == "dense")
    pruned = runs.filter(pl.col("method") != "dense")
    body = runs if config.include_dense or pruned.is_empty() else pruned
    key = row_key(body, config.group_by)
    families = _families(body, config.metrics)
    if not families:
        raise CpsError(
            f"no metric of {', '.join(config.metrics)} in the selected runs (evaluate them: cps eval RUN_ID)"
        )
    report = Report(runs=runs.height)
    if not config.pivot:  # with a pivot, the pivoted tables show the same numbers, readably
        columns = [c for family in families.values() for c in family]
        report.sections.append(
            Section(
                "Metrics (mean ± std over runs)", aggregate(body, key, columns), key, note=_runs_note(body)
            )
        )
    else:
        for family, family_columns in families.items():
            report.sections += _pivot_sections(body, dense, key, family, family_columns, config)
    if "acc" in families:
        report.sections.append(_task_section(body, families["acc"]))
    pruning = [c for c in PRUNING_METRICS if c in pruned.columns]
    if pruning and not pruned.is_empty():
        prune_key = row_key(pruned, config.group_by)
        report.sections.append(
            Section(
                "Pruning, in-sample (calibration SNR dB, error, sparsity)",
                aggregate(pruned, prune_key, pruning),
                prune_key,
                note="calib_snr_db / calib_error: each run on its own calibration tokens (SparseGPT fits "
                "its weights to exactly those), not comparable across calibration languages; the "
                "held-out SNR per evaluation language is --metrics snr",
            )
        )
    analyses = analysis_section(store, filters)
    if analyses is not None:
        report.sections.append(analyses)
    return report


def _runs_note(frame: pl.DataFrame) -> str:
    seeds = sorted(frame["seed"].unique().to_list()) if "seed" in frame.columns else []
    return f"{frame.height} runs; seeds {', '.join(map(str, seeds))}" if seeds else f"{frame.height} runs"


def _pivot_sections(
    body: pl.DataFrame,
    dense: pl.DataFrame,
    key: list[str],
    family: str,
    columns: list[str],
    config: ReportConfig,
) -> list[Section]:

    best = "min" if family in ("ppl", "bpb") else "max"
    if config.pivot == EVAL_LANG:
        index = list(dict.fromkeys([*key, *(["model"] if "model" in body.columns else [])]))
        long = _by_language(body, index, columns).drop_nulls(EVAL_LANG)
        if family == "acc":  # one accuracy per language would mix tasks: keep the task family in the key
            key = [*key, "task"]
        else:
            long = long.drop("task")
        pivot_column = EVAL_LANG
    else:
        if config.pivot not in body.columns:
            raise CpsError(f"cannot pivot on {config.pivot!r}: use eval_lang or a param of the runs")
        key = [k for k in key if k != config.pivot]
        long = body.select(*key, config.pivot, *columns).unpivot(
            index=[*key, config.pivot], on=columns, variable_name="metric", value_name="value"
        )
        key = [*key, "metric"]
        pivot_column = config.pivot
    wide = _wide(long, key, pivot_column)
    diagonal = "calib_lang" if pivot_column == EVAL_LANG and "calib_lang" in key else None
    title = f"{family} by {' x '.join(key)} (rows) and {pivot_column} (columns), mean ± std"
    note = NOTES.get(family, INTERVAL_NOTE if "ci_low" in long.columns else "")
    sections = [Section(title, wide, key, note=note, best=best, diagonal=diagonal, heatmap=True)]
    if family in ("ppl", "bpb") and pivot_column == EVAL_LANG and not dense.is_empty():
        change = _change_vs_dense(long, dense, key, family)
        if change is not None:
            sections.append(
                Section(
                    f"{family} change against the dense baseline (%), by {' x '.join(key)} and {EVAL_LANG}",
                    change,
                    key,
                    note="(pruned / dense - 1) x 100, dense = the method=dense run of the same model",
                    best=best,
                    diagonal=diagonal,
                    heatmap=True,
                )
            )
    return sections


def _by_language(frame: pl.DataFrame, index: list[str], columns: list[str]) -> pl.DataFrame:
    """Metric columns as rows (metric, value) with the language and task family each names, and
    the metric's interval (ci_low, ci_high) where the runs logged one."""
    import polars as pl

    keys = list(dict.fromkeys(["run_id", *index]))
    long = frame.select(*keys, *columns).unpivot(
        index=keys, on=columns, variable_name="metric", value_name="value"
    )
    for bound in INTERVAL:
        sources = {c: _bound_column(c, bound) for c in columns if _bound_column(c, bound) in frame.columns}
        if sources:
            bounds = (
                frame.select(*keys, *sources.values())
                .rename({source: column for column, source in sources.items()})
                .unpivot(index=keys, on=list(sources), variable_name="metric", value_name=bound)
            )
            long = long.join(bounds, on=[*keys, "metric"], how="left", nulls_equal=True)
    return (
        long.drop_nulls("value")
        .with_columns(
            pl.col("metric").map_elements(_lang, return_dtype=pl.String).alias(EVAL_LANG),
            pl.col("metric").map_elements(_family, return_dtype=pl.String).alias("task"),
        )
        .drop([] if "run_id" in index else ["run_id"])
    )


def _wide(long: pl.DataFrame, key: list[str], pivot_column: str) -> pl.DataFrame:
    """Columns per pivot value v: v (mean), v.std and, with intervals, v.ci_low and v.ci_high
    (the mean of the runs' bounds)."""
    import polars as pl

    bounds = [bound for bound in INTERVAL if bound in long.columns]
    stats = long.group_by(*key, pivot_column).agg(
        pl.col("value").mean().alias("mean"),
        pl.col("value").std().fill_null(0.0).alias("std"),
        *[pl.col(bound).mean() for bound in bounds],
    )
    values = sorted(stats[pivot_column].unique().to_list())
    wide = stats.pivot(on=pivot_column, index=key, values="mean")
    suffixes = ["std", *bounds]
    for suffix in suffixes:
        part = stats.pivot(on=pivot_column, index=key, values=suffix)
        wide = wide.join(part.rename({v: f"{v}.{suffix}" for v in values}), on=key, nulls_equal=True)
    columns = [c for v in values for c in (v, *(f"{v}.{suffix}" for suffix in suffixes))]
    return wide.select(*key, *columns).sort(key)


def _change_vs_dense(
    long: pl.DataFrame, dense: pl.DataFrame, key: list[str], family: str
) -> pl.DataFrame | None:
    import polars as pl

    columns = [c for c in dense.columns if c.startswith(f"m:{family}.")]
    if not columns or "model" not in dense.columns or "model" not in long.columns:
        return None
    base = (
        dense.select("model", *columns)
        .unpivot(index="model", on=columns, variable_name="metric", value_name="dense")
        .drop_nulls("dense")
        .group_by("model", "metric")
        .agg(pl.col("dense").mean())
    )
    joined = long.join(base, on=["model", "metric"], how="inner")
    if joined.is_empty():
        return None
    joined = joined.with_columns(((pl.col("value") / pl.col("dense") - 1) * 100).alias("value"))
    return _wide(joined.drop("dense"), key, EVAL_LANG)


def _task_section(body: pl.DataFrame, columns: list[str]) -> Section:
    import polars as pl

    index = [k for k in ("method",) if k in body.columns]
    long = _by_language(body, index, columns).with_columns(pl.col(EVAL_LANG).fill_null("-"))
    task_key = [*index, "task"]
    return Section(
        f"Task accuracy by {' x '.join(task_key)} and language (mean ± std over all runs of the row)",
        _wide(long, task_key, EVAL_LANG),
        task_key,
        note=f"acc; for {', '.join(MUTUAL_INFO_TASKS)} acc_mutual_info (plain acc rewards short candidates). "
        + INTERVAL_NOTE,
        best="max",
        heatmap=True,
    )


def analysis_section(store: tracking.Store, filters: Mapping[str, str]) -> Section | None:
    """Headline numbers of the finished analysis runs (IoU, LAPE overlap, LSAR share, paper check)."""
    import polars as pl

    rows = []
    for record in tracking.find_runs(store, "analyze"):
        if not _matches(record, filters):
            continue
        members = json.loads(record.params.get("runs", "{}"))
        row = {
            "model": record.params.get("model"),
            "method": record.params.get("method"),
            "pattern": record.params.get("pattern"),
            "vary": record.params.get("vary"),
            "members": ",".join(sorted(members)),
            "paper_low_iou_agrees": record.tags.get("cps.paper_low_iou_agrees"),
        }
        for name in ("iou.mean", "lape.overlap.mean", "lsar.specific_share.mean", "cross_snr.own_lang_best"):
            row[name] = record.metrics.get(name, math.nan)
        rows.append(row)
    if not rows:
        return None
    frame = pl.DataFrame(rows).unique(subset=["model", "method", "pattern", "vary", "members"], keep="first")
    key = ["model", "method", "pattern", "vary", "members", "paper_low_iou_agrees"]
    return Section(
        "Analyses (latest per group): mask IoU, LAPE overlap, LSAR, cross-language SNR",
        frame.sort(key[:4]),
        key,
    )


# ---------------------------------------------------------------------------------------------
# Rendering


INTERVAL_NOTE = (
    "(a–b): Wilson 95% interval over the task's items (averaged over runs when a row holds several); "
    "a wide one says the sample is too small to compare"
)
_COMPANIONS = (".std", ".ci_low", ".ci_high")  # columns that annotate the value column before them


def _value_columns(section: Section) -> list[str]:
    return [
        c for c in section.frame.columns if c not in section.key and not c.endswith(_COMPANIONS) and c != "n"
    ]


def _cells(section: Section) -> tuple[list[str], list[list[str]]]:
    """Header and text rows: 'mean ± std', best of each column starred, diagonal in [brackets]."""
    import polars as pl

    frame = section.frame
    values = _value_columns(section)
    best_rows: dict[str, set[int]] = {}
    if section.best:
        # The best row of each column among the pruned rows (the dense baseline is the reference),
        # and per value of the other key columns (per method) when there is a diagonal.
        parts = [k for k in section.key if k != section.diagonal] if section.diagonal else []
        indexed = frame.with_row_index("_row")
        if "method" in frame.columns:
            indexed = indexed.filter(pl.col("method") != "dense")
        for column in values:
            if not frame[column].dtype.is_numeric():
                continue
            ranked = indexed.drop_nulls(column)
            best = pl.col(column).max() if section.best == "max" else pl.col(column).min()
            if parts:
                ranked = ranked.with_columns(best.over(parts).alias("_best"))
            else:
                ranked = ranked.with_columns(best.alias("_best"))
            ties = ranked.filter(pl.col(column) == pl.col("_best"))  # every row that ties is starred
            best_rows[column] = set(ties["_row"].to_list())
    header = [*section.key, *(["n"] if "n" in frame.columns else []), *values]
    rows = []
    for index, row in enumerate(frame.iter_rows(named=True)):
        text = [str(row[k]) for k in section.key]
        if "n" in frame.columns:
            text.append(str(row["n"]))
        for column in values:
            value = row[column]
            if isinstance(value, float):
                cell = "—" if math.isnan(value) else _number(value)
                std = row.get(f"{column}.std")
                if isinstance(std, float) and std > 0 and not math.isnan(value):
                    cell += f" ± {_number(std)}"
                low, high = row.get(f"{column}.ci_low"), row.get(f"{column}.ci_high")
                if isinstance(low, float) and isinstance(high, float) and not math.isnan(value):
                    cell += f" ({_number(low)}–{_number(high)})"
            else:
                cell = "—" if value is None else str(value)
            if index in best_rows.get(column, ()):
                cell += " *"
            if section.diagonal and str(row.get(section.diagonal)) == column:
                cell = f"[{cell}]"
            text.append(cell)
        rows.append(text)
    return header, rows


def _number(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


LEGEND = (
    "`*` best of the column; `[x]` calibrated on the language it is evaluated on; "
    "`(a–b)` Wilson 95% interval over the items."
)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise CpsError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def render(report: Report, fmt: str) -> str:
    check_format(fmt)
    if fmt == "json":
        return json.dumps(
            [{"title": s.title, "key": s.key, "rows": s.frame.to_dicts()} for s in report.sections],
            indent=1,
            default=str,
        )
    if fmt == "csv":
        return "\n".join(f"# {s.title}\n{s.frame.write_csv()}" for s in report.sections)
    if fmt == "html":
        return _html(report)
    if fmt == "markdown":
        return _markdown(report)
    return _text(report)


def _markdown(report: Report, images: Mapping[int, list[str]] | None = None) -> str:
    lines = [f"# cps report\n\n{report.runs} finished prune runs. {LEGEND}\n"]
    for index, section in enumerate(report.sections):
        header, rows = _cells(section)
        lines.append(f"## {section.title}\n")
        if section.note:
            lines.append(f"{section.note}\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        for image in (images or {}).get(index, []):
            lines.append(f"\n![{section.title}]({image})")
        lines.append("")
    return "\n".join(lines)


def _html(report: Report, images: Mapping[int, list[str]] | None = None) -> str:
    from html import escape

    parts = [
        "<!doctype html><meta charset='utf-8'><title>cps report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}</style>",
        f"<h1>cps report</h1><p>{report.runs} finished prune runs. {escape(LEGEND.replace('`', ''))}</p>",
    ]
    for index, section in enumerate(report.sections):
        header, rows = _cells(section)
        parts.append(f"<h2>{escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p>{escape(section.note)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        for image in (images or {}).get(index, []):
            parts.append(f"<img src='{escape(image)}' alt='{escape(section.title)}'>")
    return "\n".join(parts)


def _text(report: Report) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    console.print(f"{report.runs} finished prune runs. {LEGEND.replace('`', '')}")
    for section in report.sections:
        header, rows = _cells(section)
        table = Table(title=section.title, caption=section.note or None)
        for column in header:
            table.add_column(column, justify="left" if column in section.key else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    return buffer.getvalue()


def heatmaps(section: Section) -> dict[str, Figure]:
    """A pivot section as heatmaps (rows = its key, columns = the pivoted values). With a diagonal
    column (calib_lang) and more key columns, one heatmap per value of the others, so the
    calibration language is the row and its diagonal is boxed."""
    import polars as pl

    from cps.analysis.plots import matrix_heatmap

    values = _value_columns(section)
    rows = [section.diagonal] if section.diagonal else section.key
    others = [k for k in section.key if k not in rows]
    frame = section.frame
    if "method" in frame.columns and (frame["method"] != "dense").any():
        frame = frame.filter(pl.col("method") != "dense")  # the reference, not a calibration choice
    frame = frame.with_columns(
        pl.concat_str([pl.col(k).cast(pl.String) for k in others], separator=" ").alias("_part")
        if others
        else pl.lit("").alias("_part")
    )
    label = " / ".join(rows)
    figures = {}
    for part in sorted(frame["_part"].unique().to_list()):
        long = (
            frame.filter(pl.col("_part") == part)
            .select(
                pl.concat_str([pl.col(k).cast(pl.String) for k in rows], separator=" / ").alias(label),
                *values,
            )
            .unpivot(index=label, on=values, variable_name=EVAL_LANG, value_name="value")
            .drop_nulls("value")
        )
        if long.height:
            title = f"{section.title}" + (f" — {part}" if part else "")
            relative = section.diagonal is not None and section.best == "min"  # ppl, bpb: scales differ
            figures[part] = matrix_heatmap(long, label, EVAL_LANG, "value", title, section.best, relative)
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
        if section.heatmap and section.frame.height and _value_columns(section):
            pngs = []
            for part, figure in heatmaps(section).items():
                suffix = re.sub(r"[^a-z0-9]+", "_", part.lower()).strip("_")
                png = out / "plots" / f"{index:02d}_{slug}{'_' + suffix if suffix else ''}.png"
                figure.savefig(png, dpi=110)
                pngs.append(f"plots/{png.name}")
                written.append(out / pngs[-1])
            images[index] = pngs
    for name, text in (("report.md", _markdown(report, images)), ("report.html", _html(report, images))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written
