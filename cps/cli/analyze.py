"""`cps analyze`: cross-run analyses of comparison groups found in the tracking store."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import Experiment, TrackingUri


def analyze_command(
    group_by: Annotated[str, typer.Option(help="The param that varies within a group.")] = "calib_lang",
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Only runs with this param value (key=value).")
    ] = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Mask IoU across calibration languages and SNR by language, one analysis run per group."""
    from cps.errors import CpsError
    from cps.stages.analyze import AnalyzeConfig, run_analyze
    from cps.tracking import Store

    filters = []
    for item in filter_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CpsError(f"bad --filter {item!r}; use key=value, e.g. method=wanda")
        filters.append((key.strip(), value.strip()))
    results = run_analyze(AnalyzeConfig(group_by, tuple(filters)), Store(tracking_uri, experiment))
    for result in results:
        shared = result.group.shared
        members = ", ".join(sorted(result.group.members))
        typer.echo(
            f"group {shared.get('model')} {shared.get('method')} {shared.get('pattern')} "
            f"sparsity {shared.get('sparsity')} seed {shared.get('seed')}: {group_by} = {members}"
        )
        typer.echo(
            f"  mean mask IoU {result.headlines['iou.mean']:.3f}; lowest in early layers: "
            f"{', '.join(result.lowest_modules)} "
            f"({'agrees' if result.paper_agrees else 'differs from'} the paper: o_proj, down_proj)"
        )
        typer.echo(f"  analysis run {result.run_id}")
