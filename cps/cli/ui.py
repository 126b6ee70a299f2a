"""`cps ui`: the MLflow UI for the project store on http://127.0.0.1:PORT."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import Experiment, TrackingUri


def ui_command(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[
        str | None,
        typer.Option(help="Interface to bind (default 127.0.0.1). Others expose the store: opt in here."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Serve the MLflow UI for the tracking store; prints the URL, Ctrl-C stops it."""
    from cps.tracking import Store
    from cps.ui import UiConfig, is_loopback, serve

    config = UiConfig(port, host, workers)
    if not is_loopback(config.bind):
        typer.echo(
            f"warning: serving on {config.bind}: anyone reaching this machine can read and write the store",
            err=True,
        )
    code = serve(Store(tracking_uri, experiment), config, typer.echo)
    raise typer.Exit(code)
