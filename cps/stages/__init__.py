"""Stage workflows: each joins library calls to the tracking store for one `cps` command."""
