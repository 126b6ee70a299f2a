"""`cps sweep STUDY.toml`: the whole grid of a study, evaluated and analysed; rerun to resume."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import DataDir, Experiment, TrackingUri


def sweep_command(
    study_file: Annotated[str, typer.Argument(metavar="STUDY.toml", help="The study (see studies/).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (and what is already done); run nothing.")
    ] = False,
    executor: Annotated[str, typer.Option(help="local (one cell after another) | ray.")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local one).")
    ] = None,
    cpus_per_cell: Annotated[int, typer.Option(help="Ray: CPUs per cell when there are no GPUs.")] = 1,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Run every cell of a study (prune + evaluate), then its analyses; done cells are skipped."""
    from cps.errors import CpsError
    from cps.stages.sweep import ACTIONS, local_executor, plan_cells, ray_executor, run_sweep
    from cps.study import check_inputs, load_study
    from cps.tracking import Store, client

    if executor not in ("local", "ray"):
        raise CpsError(f"unknown executor {executor!r}; use local or ray")
    if cpus_per_cell < 1:
        raise CpsError(f"--cpus-per-cell must be positive (got {cpus_per_cell})")
    study = load_study(study_file, data_dir)
    store = Store(tracking_uri, experiment)
    client(store)
    if dry_run:  # plans without reading task data: it says where each task's data will come from
        tasks = check_inputs(study, read_tasks=False)
        plans = plan_cells(study, store)
        _print_plan(study.name, [(p.cell.label, ACTIONS[p.action], p.run_id or "") for p in plans])
        pending = sum(1 for plan in plans if plan.pending)
        analyses = [f"{a.group_by}{' with activations' if a.activations else ''}" for a in study.analyses]
        typer.echo(
            f"{pending} of {len(plans)} cells to run; then analyses by {', '.join(analyses) or 'none'}"
        )
        local = _print_tasks(study, tasks)
        _print_estimate(study, local, pending == len(plans))
        return
    _say_missing(study)
    run = local_executor if executor == "local" else ray_executor(address, cpus_per_cell)
    result = run_sweep(study, store, run)
    done = len(result.plans) - len(result.failed)
    typer.echo(
        f"sweep {study.name}: {done}/{len(result.plans)} cells done "
        f"({sum(1 for p in result.plans if not p.pending)} were already), "
        f"{len(result.analysis_run_ids)} analyses run, {result.skipped_analyses} already done, "
        f"{result.seconds / 60:.1f} min; parent run {result.parent_run_id}"
    )
    typer.echo(_time_line(result))
    for outcome in result.failed:
        typer.echo(f"  FAILED {outcome.plan.cell.label}: {outcome.error}")
    for error in result.analysis_errors:
        typer.echo(f"  FAILED analysis: {error}")
    if result.failed or result.analysis_errors:
        typer.echo("rerun the same command to retry what failed; finished cells are skipped")
        raise typer.Exit(1)
    report = f"cps report --filter study={study.name} --pivot eval_lang --metrics ppl,snr,acc"
    typer.echo(f"next: {report}  (cps ui: browse runs)")


def _time_line(result) -> str:
    """Where the time went: `time: prune 4.1 min, eval 2.0 min (14 cells: 8.6 s each), ...`
    (per cell in the parent run's cells.parquet: prune_s, eval_s)."""
    split = result.time_split()
    evaluated = [o.eval_seconds for o in result.outcomes if o.eval_seconds is not None]
    parts = []
    for part, seconds in split.items():
        if part in ("failed cells", "other") and seconds < 0.05:
            continue
        text = f"{part} {seconds / 60:.1f} min"
        if part == "eval" and evaluated:
            text += f" ({len(evaluated)} cells, {sum(evaluated) / len(evaluated):.1f} s each)"
        parts.append(text)
    return "time: " + ", ".join(parts)


def _print_plan(name: str, rows: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {name}")
    for column in ("cell", "status", "run"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


def _say_missing(study) -> None:
    """The (family, language) pairs the study asks for and leaves out (`skip_missing`), in one line."""
    from cps.evaluation.tasks import missing_tasks

    evaluate = study.evaluate
    missing = missing_tasks(list(evaluate.tasks), list(evaluate.langs), evaluate.data_dir)
    if missing and evaluate.skip_missing:  # without it, check_inputs refuses them in one line
        typer.echo(f"no task for {', '.join(missing)}: left out (skip_missing)")
    from cps.study import left_out

    for line in left_out(study):  # combinations a method cannot take
        typer.echo(f"left out: {line}")


def _print_tasks(study, tasks: list[str]) -> list[str]:
    """The tasks per evaluation language, the pairs left out, where each task's data comes from
    and the derived GPU cost. Returns the tasks whose data is on this machine."""
    from cps.evaluation.tasks import task_data
    from cps.metrics import split_task
    from cps.study import estimate_gpu_hours

    calibrations = {
        f"{c.nsamples} x {c.seqlen} tokens of {c.corpus}"
        for c in (cell.prune.calibration for cell in study.cells)
        if c is not None
    }
    typer.echo(f"calibration per pruned cell: {', '.join(sorted(calibrations)) or '-'}")
    by_lang: dict[str, list[str]] = {}
    for name in tasks:
        by_lang.setdefault(split_task(name)[1] or "-", []).append(name)
    typer.echo("tasks per evaluation language (plus perplexity and held-out SNR in each):")
    for lang in study.evaluate.langs:
        typer.echo(f"  {lang}: {', '.join(by_lang.get(lang, [])) or '(none)'}")
    _say_missing(study)
    typer.echo("task data (not read by a dry run):")
    local: list[str] = []
    sources = task_data(tasks, study.evaluate.data_dir)
    for data in sources:
        state = {True: "here", False: "NOT HERE", None: "fetched by lm-eval"}[data.here]
        typer.echo(f"  {data.family} ({len(data.tasks)} tasks): {data.source} [{state}]")
        local += list(data.tasks) if data.here else []
    absent = [data.family for data in sources if data.here is False]
    if absent:
        typer.echo(f"  the time and power below leave out {', '.join(absent)}: its data is not here")
    estimate = estimate_gpu_hours(study, tasks)
    if estimate.gpu_hours is None:
        typer.echo("GPU time: unknown (a model's size is unknown)")
    else:
        typer.echo(
            f"GPU time, derived: ~{estimate.gpu_hours:,.0f} GPU hours for {estimate.cells} cells "
            f"(2 x parameters FLOPs per token at {estimate.tflops:.0f} TFLOP/s effective; pruning = "
            "2.3x (Wanda) or 3.0x (SparseGPT) a dense pass over the calibration tokens, as measured "
            "on the CPU; see cps.study)"
        )
    return local


def _print_estimate(study, tasks: list[str], fresh: bool) -> None:
    """This machine's time for the whole study (from a measured dense pass) and the smallest pooled
    own-language accuracy effect its task items can detect."""
    from cps.stages.estimate import estimate_time, task_power

    estimate = estimate_time(study, tasks)
    if estimate is None:
        typer.echo("time on this machine: not estimated (several models)")
    else:
        typer.echo(
            f"time on this machine{'' if fresh else ' (all cells, done ones included)'}: "
            f"~{estimate.total_s / 60:.0f} min (pruning {estimate.prune_s / 60:.1f}, evaluation "
            f"{estimate.eval_s / 60:.1f}, analyses {estimate.analyses_s / 60:.1f}), from this machine's "
            f"dense pass: decoder {estimate.rates.decoder_s * 1e3:.2f} ms a token, LM head "
            f"{estimate.rates.head_s * 1e3:.2f} ms a scored position ({estimate.rates.measured}; "
            "cps.stages.estimate)"
        )
    for power in task_power(study, tasks):
        head = f"  {power.family}: {power.items} items x {power.languages} languages: "
        if power.detectable is None:
            typer.echo(head + "too few to test (a pooled effect needs 10 items a language, 30 in all)")
        else:
            typer.echo(
                head + f"detects a pooled own-language accuracy effect of {100 * power.detectable:.1f} "
                "points (80% power, 5%)"
            )
