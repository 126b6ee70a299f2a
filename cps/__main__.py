"""`python -m cps` is the `cps` command."""

from cps.cli import main

main()
