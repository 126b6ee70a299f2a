"""`cps models`: the model aliases, where each comes from, and whether it is converted already."""

from __future__ import annotations


def models_command() -> None:
    """List model aliases (any Hugging Face id or local folder works too)."""
    from rich.console import Console
    from rich.table import Table

    from cps.models import DEFAULT_MODEL, MODELS

    table = Table(title="cps models (any HF id or local folder also works)")
    for column in ("alias", "source", "weights", "description"):
        table.add_column(column)
    for spec in MODELS.values():
        weights = spec.hf_id or spec.package or "random init, seeded"
        name = f"{spec.name} (default)" if spec.name == DEFAULT_MODEL else spec.name
        table.add_row(name, spec.source, weights, spec.description)
    Console().print(table)
