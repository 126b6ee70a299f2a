"""`cps report`: comparison tables (and with --out, a markdown/html report with heatmaps) from the store."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import Experiment, TrackingUri, parse_filters


def report_command(
    group_by: Annotated[
        str, typer.Option(help="Params that make the rows (comma-separated): calib_lang, method, ...")
    ] = "calib_lang",
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help="Only runs with this param (or cps.<key> tag) value: key=value."),
    ] = None,
    metrics: Annotated[str, typer.Option(help="Metric families, comma-separated.")] = "ppl,bpb,acc",
    pivot: Annotated[
        str | None, typer.Option(help="Columns: eval_lang (the metric's language) or a param.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv | json | html.")] = "table",
    out: Annotated[
        str | None, typer.Option(help="Also write report.md, report.html, CSVs and heatmap PNGs here.")
    ] = None,
    no_dense: Annotated[bool, typer.Option("--no-dense", help="Leave the dense baseline rows out.")] = False,
    significance: Annotated[
        bool,
        typer.Option(help="Own- vs other-language calibration, paired bootstrap on the per-item results."),
    ] = True,
    delta: Annotated[
        float | None,
        typer.Option(
            help="Equivalence margin of the findings' verdicts, accuracy / 100 (default: the study's "
            "[findings] delta with --filter study=NAME, else 0.02)."
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Tables of the finished runs: mean ± std over seeds, pivots, change against the dense baseline."""
    from cps.report import ReportConfig, build_report, check_format, render, write_report
    from cps.tracking import Store

    check_format(fmt)  # before reading the store
    config = ReportConfig(
        group_by=tuple(p.strip() for p in group_by.split(",") if p.strip()),
        filters=parse_filters(filter_),
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        pivot=pivot,
        include_dense=not no_dense,
        significance=significance,
        delta=delta,
    )
    report = build_report(Store(tracking_uri, experiment), config)
    typer.echo(render(report, fmt))
    if fmt == "csv" and len(report.sections) > 1:
        typer.echo(
            f"cps: csv shows one of {len(report.sections)} tables ({report.main.title}); "
            "--out DIR writes every table as a CSV file",
            err=True,
        )
    if out:
        written = write_report(report, out)
        typer.echo(f"report written to {out}/report.md and report.html ({len(written)} files)")
