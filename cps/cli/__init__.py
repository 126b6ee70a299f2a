"""The `cps` command line: one module per subcommand; heavy libraries are imported inside commands."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import typer

from cps.errors import CpsError

app = typer.Typer(
    name="cps",
    help="Calibration-language pruning study: prune multilingual LLMs with SparseGPT and Wanda, "
    "calibrated on a chosen language, and measure what that choice did.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

from cps.cli import analyze, calibrate, data, evaluate, models, prune, quantize, report, sweep, ui  # noqa: E402

app.add_typer(data.app, name="data")
app.command("models")(models.models_command)
app.command("calibrate")(calibrate.calibrate_command)
app.command("prune")(prune.prune_command)
app.command("quantize")(quantize.quantize_command)
app.command("eval")(evaluate.eval_command)
app.command("analyze")(analyze.analyze_command)
app.command("sweep")(sweep.sweep_command)
app.command("report")(report.report_command)
app.command("ui")(ui.ui_command)


def _terminate(signum: int, frame: object) -> NoReturn:
    # SIGTERM unwinds like Ctrl-C, so open runs end KILLED instead of staying RUNNING.
    raise KeyboardInterrupt


def _setup_logging() -> None:
    """Log lines go to stderr (stdout is the command's result): coloured on a terminal, one plain
    line per record otherwise (CI logs, a worker's captured output)."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False, markup=False)
        layout = "%(message)s"
    else:
        handler, layout = logging.StreamHandler(sys.stderr), "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=layout, handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    _setup_logging()
    try:
        app()
    except CpsError as error:
        print(f"cps: error: {error}", file=sys.stderr)
        sys.exit(2)


def run() -> NoReturn:
    """The console script (`cps`, `python -m cps`): `main`, then the process ends without the
    interpreter's teardown. Once a command has imported torch, transformers and mlflow (~5,000
    modules), tearing them down one by one takes ~2 s and does nothing a finished process needs:
    the exit handlers still run (MLflow's, logging's flush, temporary folders' cleanup), the output
    is flushed, and the exit status is the command's. A process with threads still working (an
    executor's workers) ends the ordinary way, which waits for them."""
    try:
        main()
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter does
            print(exit_.code, file=sys.stderr)
            code = 1
    working = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if working or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say there
            stream.flush()
    os._exit(code)
