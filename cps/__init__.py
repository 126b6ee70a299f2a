"""cps — calibration-language pruning study (reproduces and extends arXiv 2408.14398)."""

__version__ = "0.1.0"
