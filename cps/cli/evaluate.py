"""`cps eval`: perplexity and zero-shot tasks per language, logged into the evaluated run."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import DataDir, Experiment, OffloadActivations, Stream, TrackingUri


def eval_command(
    run_id: Annotated[str | None, typer.Argument(help="Prune run to evaluate.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Evaluate this dense model instead of a run.")
    ] = None,
    langs: Annotated[
        str, typer.Option(help="Languages for perplexity and pack tasks.")
    ] = "ar,de,en,es,ru,sw,zh",
    tasks: Annotated[
        str,
        typer.Option(
            help="Families, one task per language: the offline pack (sib, flores_next, xcopa) and the "
            "paper's suite from lm-eval (belebele, arc, mmlu, hellaswag); or task names (sib_sw, any "
            "lm-eval task)."
        ),
    ] = "",
    corpus: Annotated[str, typer.Option(help="Held-out text: flores, or textdir:<folder>.")] = "flores",
    seqlen: Annotated[
        int, typer.Option(help="Tokens per held-out window, BOS included (each document scored alone).")
    ] = 1024,
    stride: Annotated[
        int | None,
        typer.Option(help="Window step inside a document longer than a window (default seqlen // 2)."),
    ] = None,
    limit: Annotated[
        float | None, typer.Option(help="Items per task (or a fraction), for quick runs.")
    ] = None,
    task_limit: Annotated[
        list[str] | None,
        typer.Option(help="Items for one family or task, e.g. sib=2 (repeatable; overrides --limit)."),
    ] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Perplexity on the first N held-out documents per language.")
    ] = None,
    skip_missing: Annotated[
        bool,
        typer.Option(
            help="Leave out (family, language) pairs with no task (XCOPA in German, ARC in Swahili), "
            "naming them; without it such a pair fails before any run."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 8,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    stream: Stream = None,
    offload_activations: OffloadActivations = False,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Evaluate a pruned model (or the dense one): ppl.<lang>, bpb.<lang>, snr_db.<lang>, acc.<task>."""
    from cps.config import EvalConfig
    from cps.languages import parse_languages
    from cps.stages.evaluate import run_eval
    from cps.tracking import Store

    config = EvalConfig(
        langs=tuple(parse_languages(langs)),
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        corpus=corpus,
        seqlen=seqlen,
        stride=stride,
        limit=limit,
        max_docs=max_docs,
        task_limits=_task_limits(task_limit),
        skip_missing=skip_missing,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        data_dir=data_dir,
        stream=stream,
        offload_activations=offload_activations,
    )
    if skip_missing:
        from cps.evaluation.tasks import missing_tasks

        left_out = missing_tasks(list(config.tasks), list(config.langs), data_dir)
        if left_out:
            typer.echo(f"no task for {', '.join(left_out)}: left out (--skip-missing)")
    result = run_eval(config, Store(tracking_uri, experiment), run_id, model=model)
    _print_table(result.scores)
    _print_tasks(result.scores, result.items)
    typer.echo(f"logged into run {result.run_id}")


def _print_tasks(scores, items) -> None:
    """Per task: the score its accuracy reads and the gold-choice margin with their 95% intervals
    (as logged), and whether the model is above chance (one-sided exact binomial test on its
    items): a task at chance decides nothing."""
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from cps.analysis.findings import ALPHA, chance_tests, shown_answers
    from cps.metrics import MARGIN_OF, SHOWN_SCORE

    frames = [
        shown_answers(frame, name.removeprefix("items/").removesuffix(".parquet"))
        for name, frame in items.items()
        if not name.startswith("items/ppl_")
    ]
    answers = [frame for frame in frames if frame is not None]
    if not answers:
        return
    logged = {(name, metric): (value, low, high) for name, metric, value, _, low, high in scores.iter_rows()}

    def cell(task: str, metric: str | None, digits: str) -> str:
        value, low, high = logged.get((task, metric), (None, None, None))
        if value is None:
            return "—"
        bounds = "" if low is None else f" ({low:{digits}2f}–{high:{digits}2f})"
        return f"{value:{digits}3f}{bounds}"

    table = Table(title=f"tasks (above chance: one-sided exact binomial, p < {ALPHA})")
    for column in ("task", "lang", "items", "accuracy", "margin", "chance", "p", "informative"):
        table.add_column(column)
    for test in chance_tests(pl.concat(answers)).iter_rows(named=True):
        name, shown = f"{test['task']}_{test['eval_lang']}", SHOWN_SCORE.get(test["task"], "acc")
        informative = test["informative"]
        table.add_row(
            test["task"],
            test["eval_lang"],
            str(test["items"]),
            cell(name, shown, "."),
            cell(name, MARGIN_OF.get(shown), "+."),
            "—" if test["chance"] is None else f"{test['chance']:.3f}",
            "—" if test["p"] is None else f"{test['p']:.2g}",
            "n/a" if informative is None else ("yes" if informative else "NO: at chance"),
        )
    Console(width=140).print(table)


def _print_table(scores) -> None:
    from rich.console import Console
    from rich.table import Table

    from cps.metrics import MARGINS, split_task

    table = Table(title="evaluation")
    table.add_column("lang")
    by_lang: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for name, metric, value, _, low, high in scores.iter_rows():
        if metric in MARGINS:  # in the tasks table, with the accuracy they belong to
            continue
        family, task_lang = split_task(name)
        lang, column = (task_lang, f"{family} {metric}") if task_lang else (name, metric)
        text = f"{value:.4g}" if low is None else f"{value:.3f} ({low:.2f}–{high:.2f})"
        if metric == "snr_db":
            column = "held-out SNR dB"
        by_lang.setdefault(lang, {})[column] = text
        if column not in columns:
            columns.append(column)
    for column in columns:
        table.add_column(column)
    for lang, cells in by_lang.items():
        table.add_row(lang, *(cells.get(column, "") for column in columns))
    Console().print(table)


def _task_limits(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    from cps.cli.options import parse_filters
    from cps.errors import CpsError

    limits = []
    for name, value in parse_filters(items, "--task-limit"):
        try:
            limits.append((name, float(value)))
        except ValueError:
            raise CpsError(f"bad --task-limit {name}={value}: the limit must be a number") from None
    return tuple(limits)
