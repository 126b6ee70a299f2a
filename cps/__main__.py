"""`python -m cps` is the `cps` command."""

from cps.cli import run

run()
