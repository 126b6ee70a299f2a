"""`cps data list` and `cps data check`: what the data dir holds, and whether it parses."""

from __future__ import annotations

import typer

from cps.cli.options import DataDir
from cps.data.inventory import LOCAL_CORPORA

app = typer.Typer(help="Corpora in the data dir.", no_args_is_help=True)


@app.command("list")
def list_command(data_dir: DataDir = None) -> None:
    """Languages x corpora with their sizes."""
    from rich.console import Console
    from rich.table import Table

    from cps.data.inventory import inventory

    found = inventory(data_dir)
    table = Table(title=f"corpora in {found.root}")
    table.add_column("lang")
    table.add_column("name")
    for name in (*LOCAL_CORPORA, "mc4"):
        table.add_column(name)
    for lang in found.languages:
        cells = [found.cell(name, lang.code) for name in (*LOCAL_CORPORA, "mc4")]
        table.add_row(lang.code, lang.name, *cells)
    Console().print(table)
    for problem in found.problems:
        typer.echo(f"problem: {problem}", err=True)


@app.command("check")
def check_command(data_dir: DataDir = None) -> None:
    """Verify that every corpus file is present and parses."""
    from cps.data.inventory import inventory
    from cps.errors import CpsError

    found = inventory(data_dir)
    for (name, code), size in sorted(found.sizes.items()):
        typer.echo(f"ok  {name:<7} {code}  {size}")
    for problem in found.problems:
        typer.echo(f"BAD {problem}")
    if found.problems:
        raise CpsError(f"{len(found.problems)} problem(s) in data dir {found.root}")
    typer.echo(f"all {len(found.sizes)} corpus files parse ({found.root})")
