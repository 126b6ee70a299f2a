"""`cps report`: comparison tables built straight from the tracking store.

load.py    the store -> frames (finished prune runs, analysis runs), metric names normalised
tables.py  frames -> sections: aggregation over seeds, pivots (calibration x evaluation
           language), change against the dense baseline, task accuracy with intervals, pruning
           figures, analysis headlines; which cells are best
render.py  sections -> text, one renderer per format
write.py   a report folder: report.md/html, heatmaps, a CSV per table
"""

from cps.report.render import check_format, render
from cps.report.tables import Report, ReportConfig, Section, build_report
from cps.report.write import write_report

__all__ = ["Report", "ReportConfig", "Section", "build_report", "check_format", "render", "write_report"]
