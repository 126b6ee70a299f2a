"""Frames -> the report's sections: aggregation over runs, pivots, change against the dense baseline,
task accuracy, pruning figures and analysis headlines, and which cells are best (`best_rows`).

Rows are the values of the `group_by` params. Runs are never averaged across models, methods,
patterns or sparsities: those of them that vary in the selection join the row key. Everything else
that varies (seeds, above all) is averaged: every number is a mean with its standard deviation over
the `n` runs of the row (std is 0 for a single run); an interval column holds the mean of the runs'
bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from cps import tracking
from cps.analysis.findings import ALPHA, LANGUAGE_ITEMS
from cps.analysis.significance import MIN_ITEMS, RESAMPLES, own_language_comparisons, summary
from cps.errors import CpsError
from cps.metrics import (
    INTERVAL,
    LANGUAGE_KINDS,
    LAYER,
    SHOWN_SCORE,
    companion,
    kind_of,
    metric_lang,
    task_family,
)
from cps.report.findings import (
    ANCHORS,
    PROTOCOLS,
    FindingsInputs,
    chance_frame,
    findings,
    findings_table,
    gather_analyses,
    pooled_frame,
    shown_margin_note,
)
from cps.report.load import SETTING_PARAMS, analysis_runs, item_results, prune_runs, study_delta
from cps.report.methods import methods_frame, recipes_frame

EVAL_LANG = "eval_lang"
PRUNING_METRICS = ("m:calib_snr_db.mean", "m:calib_error.total", "m:sparsity.actual", "m:time.prune_s")
NOTES = {
    "margin": "mean margin of the gold choice over the best other choice per item (nats, under the score "
    "the task's accuracy reads; higher is better); (a–b): Student t 95% interval over the items",
    "ppl": "token perplexity on held-out text (each document alone, BOS first; lower is better)",
    "bpb": "bits per UTF-8 byte of the scored held-out text (comparable across tokenizers)",
    "snr": "held-out SNR (dB) of the pruned model's hidden states against the dense model's on each "
    "evaluation language's text, mean over layers; higher = closer to dense",
}
INTERVAL_NOTE = (
    "(a–b): Wilson 95% interval over the task's items (averaged over runs when a row holds several); "
    "a wide one says the sample is too small to compare"
)
COMPANIONS = (".std", ".ci_low", ".ci_high")  # columns that annotate the value column before them


@dataclass(frozen=True)
class ReportConfig:
    group_by: tuple[str, ...] = ("calib_lang",)
    filters: tuple[tuple[str, str], ...] = ()
    metrics: tuple[str, ...] = ("ppl", "bpb", "acc")
    pivot: str | None = None
    include_dense: bool = True
    significance: bool = True  # own- vs other-language calibration from the per-item results
    # equivalence margin of a pooled accuracy effect (accuracy / 100); None: the study's [findings]
    # delta when the runs are one study's (study=NAME filter), else DELTA
    delta: float | None = None

    def __post_init__(self) -> None:
        if not self.group_by:
            raise CpsError("--group-by needs at least one param")
        if not self.metrics:
            raise CpsError("--metrics needs at least one metric family (ppl, bpb, acc, ...)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise CpsError(f"--delta must lie in (0, 1): accuracy points / 100 (got {self.delta})")


@dataclass
class Section:
    """One table of the report. `frame` holds the key columns, then per value column v: v (the mean)
    and its companions v.std, v.ci_low, v.ci_high where present."""

    title: str
    frame: pl.DataFrame
    key: list[str]  # the row-label columns
    note: str = ""
    best: str | None = None  # "min" or "max": star the best row of each value column
    diagonal: str | None = None  # a key column whose value marks the diagonal cell of its column
    heatmap: bool = False
    anchor: str = ""  # where links to this section point (report.md, report.html)
    links: tuple[str, ...] = ()  # columns whose cells name another section's anchor

    @property
    def values(self) -> list[str]:
        """The value columns (no key, count or companion)."""
        return [
            c for c in self.frame.columns if c not in self.key and not c.endswith(COMPANIONS) and c != "n"
        ]


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)
    runs: int = 0
    notes: list[str] = field(default_factory=list)  # lines printed under the heading

    @property
    def main(self) -> Section:
        """The first table after the findings (what `--format csv` prints)."""
        return next(s for s in self.sections if s.anchor != ANCHORS["findings"])

    def titles(self) -> dict[str, str]:
        """Anchor -> title of the sections that have one."""
        return {s.anchor: s.title for s in self.sections if s.anchor}


def best_rows(section: Section) -> dict[str, set[int]]:
    """Per value column, the rows holding its best value (every tie), among the pruned rows (the
    dense baseline is the reference) and, with a diagonal, per value of the other key columns (per
    method): what the tables star and the heatmaps too."""
    if not section.best:
        return {}
    frame = section.frame
    parts = [k for k in section.key if k != section.diagonal] if section.diagonal else []
    indexed = frame.with_row_index("_row")
    if "method" in frame.columns:
        indexed = indexed.filter(pl.col("method") != "dense")
    found = {}
    for column in section.values:
        if not frame[column].dtype.is_numeric():
            continue
        best = pl.col(column).max() if section.best == "max" else pl.col(column).min()
        ranked = indexed.drop_nulls(column).with_columns((best.over(parts) if parts else best).alias("_best"))
        found[column] = set(ranked.filter(pl.col(column) == pl.col("_best"))["_row"].to_list())
    return found


def _families(frame: pl.DataFrame, families: tuple[str, ...]) -> dict[str, list[str]]:
    """Metric columns per family, e.g. ppl -> [ppl.ar, ppl.en, ...], snr -> [snr_db.ar, ...]
    (per-layer series excluded)."""
    found: dict[str, list[str]] = {}
    for family in families:
        kind = kind_of(family)
        columns = sorted(
            c
            for c in frame.columns
            if c.startswith(f"m:{kind}.")
            and not c.endswith(f".{LAYER}")
            and (kind not in LANGUAGE_KINDS or metric_lang(c.removeprefix("m:")) is not None)
        )
        if columns:
            found[family] = columns
    return found


def _lang(column: str) -> str | None:
    return metric_lang(column.removeprefix("m:"))


def _family(column: str) -> str:
    return task_family(column.removeprefix("m:"))


def _bound_column(column: str, bound: str) -> str:
    """m:acc.sib_sw -> m:acc_ci_low.sib_sw."""
    return "m:" + companion(column.removeprefix("m:"), bound)


def aggregate(frame: pl.DataFrame, key: list[str], values: list[str]) -> pl.DataFrame:
    """Mean and std (0 for one run) of `values` per `key`; `n` runs per row; sorted by key."""
    exprs = [pl.len().alias("n")]
    for column in values:
        name = column.removeprefix("m:")
        exprs += [pl.col(column).mean().alias(name), pl.col(column).std().fill_null(0.0).alias(f"{name}.std")]
    return frame.group_by(key).agg(exprs).sort(key)


def row_key(frame: pl.DataFrame, group_by: tuple[str, ...]) -> list[str]:
    """`group_by` plus the setting params that vary among the pruned runs (dense rows are told
    apart by `method` alone: their sparsity 0 and pattern never split the pruned rows)."""
    missing = [param for param in group_by if param not in frame.columns]
    if missing:
        known = ", ".join(sorted(c for c in frame.columns if not c.startswith("m:") and c != "run_id"))
        raise CpsError(f"no prune run has the param {missing[0]!r} to group by; params: {known}")
    pruned = frame.filter(pl.col("method") != "dense") if "method" in frame.columns else frame
    extra = [
        param
        for param in SETTING_PARAMS
        if param not in group_by
        and param in frame.columns
        and (pruned[param].n_unique() > 1 or (param == "method" and frame[param].n_unique() > 1))
    ]
    return [*extra, *group_by]


def build_report(store: tracking.Store, config: ReportConfig) -> Report:
    tracking.client(store)
    filters = dict(config.filters)
    runs = prune_runs(store, filters)  # metric names normalised there
    if runs.is_empty():
        where = " ".join(f"{k}={v}" for k, v in config.filters) or "the store"
        raise CpsError(f"no finished prune runs in {where} ({store.resolved_uri})")
    dense = runs.filter(pl.col("method") == "dense")
    pruned = runs.filter(pl.col("method") != "dense")
    body = runs if config.include_dense or pruned.is_empty() else pruned
    key = row_key(body, config.group_by)
    families = _families(body, config.metrics)
    if not families:
        raise CpsError(
            f"no metric of {', '.join(config.metrics)} in the selected runs (evaluate them: cps eval RUN_ID)"
        )
    report = Report(runs=runs.height)
    if not config.pivot:  # with a pivot, the pivoted tables show the same numbers, readably
        columns = [c for family in families.values() for c in family]
        report.sections.append(
            Section(
                "Metrics (mean ± std over runs)",
                aggregate(body, key, columns),
                key,
                note=_runs_note(body),
                anchor=ANCHORS["metrics"],
            )
        )
    else:
        for family, family_columns in families.items():
            report.sections += _pivot_sections(body, dense, key, family, family_columns, config)
    if "acc" in families:
        report.sections.append(_task_section(body, families["acc"]))
    pruning = [c for c in PRUNING_METRICS if c in pruned.columns]
    if pruning and not pruned.is_empty():
        prune_key = row_key(pruned, config.group_by)
        report.sections.append(
            Section(
                "Pruning, in-sample (calibration SNR dB, error, sparsity)",
                aggregate(pruned, prune_key, pruning),
                prune_key,
                note="calib_snr_db / calib_error: each run on its own calibration tokens (SparseGPT fits "
                "its weights to exactly those), not comparable across calibration languages; the "
                "held-out SNR per evaluation language is --metrics snr",
            )
        )
    report.sections += _method_sections(pruned, dense)
    settings = [p for p in SETTING_PARAMS if p in pruned.columns and pruned[p].n_unique() > 1]
    answers, documents = _items(store, pruned, dense)
    inputs = FindingsInputs(pruned, dense, answers, settings)
    chance = chance_frame(inputs)
    delta = config.delta if config.delta is not None else study_delta(store, filters)
    pooled = pooled_frame(inputs, chance, delta)
    if not chance.is_empty():
        report.sections.append(_chance_section(chance))
    if not pooled.is_empty():
        report.sections.append(_pooled_section(pooled, delta))
    analyses = analysis_section(store, filters)
    if analyses is not None:
        analyses.anchor = ANCHORS["analyses"]
        report.sections.append(analyses)
    appendix, notes = significance_sections(pruned, answers, documents) if config.significance else ([], [])
    report.notes += notes
    found = findings(inputs, pooled, gather_analyses(store, filters, settings), _too_small_note(answers))
    report.sections.insert(0, _findings_section(found, report))
    report.sections += appendix
    return report


def _method_sections(pruned: pl.DataFrame, dense: pl.DataFrame) -> list[Section]:
    """Methods side by side at each sparsity, and the calibration recipes (`report.methods`)."""
    sections = []
    methods = methods_frame(pruned, dense)
    if not methods.is_empty():
        sections.append(
            Section(
                "Methods at equal sparsity (held-out; single-language calibrations)",
                methods,
                ["model", "pattern", "sparsity", "calib_corpus", "nsamples", "seqlen", "method"],
                note="ppl: mean over runs and evaluation languages; ppl_vs_dense: mean % change against "
                "the dense run; own_ppl_change: mean over languages L of ppl(calibrated on L) against "
                "the mean over other calibration languages, % (negative: own better); .best: languages "
                "where own calibration is best; snr_db / own_snr_gain_db: held-out SNR and own minus "
                "other (dB). Intervals and verdicts per method: the findings table and the appendix",
                anchor=ANCHORS["methods"],
            )
        )
    recipes = recipes_frame(pruned)
    if not recipes.is_empty():
        sections.append(
            Section(
                "Calibration recipes against own-language calibration (held-out perplexity)",
                recipes,
                ["model", "pattern", "sparsity", "nsamples", "seqlen", "method", "recipe"],
                note="vs_own: mean over evaluation languages L of ppl(recipe) / ppl(calibrated on L) - 1, "
                "%; languages: how many had an own-language run; (self): text generated by the dense model",
            )
        )
    return sections


def _items(
    store: tracking.Store, pruned: pl.DataFrame, dense: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The per-item results of the newest run of every cell (pruned and dense)."""
    settings = [p for p in SETTING_PARAMS if p in pruned.columns]
    keys = [k for k in (*settings, "calib_lang", "seed") if k in pruned.columns]
    newest = pruned.unique(subset=keys, keep="first", maintain_order=True) if keys else pruned
    bases = (
        dense.unique(subset=["model"], keep="first", maintain_order=True)
        if "model" in dense.columns
        else dense
    )
    run_ids = [*newest["run_id"].to_list(), *(bases["run_id"].to_list() if not bases.is_empty() else [])]
    return item_results(store, run_ids) if run_ids else (pl.DataFrame(), pl.DataFrame())


def _too_small_note(answers: pl.DataFrame) -> str:
    if answers.is_empty():
        return "no per-item task results"
    largest = answers.group_by("run_id", "task", "eval_lang").len()["len"].max()
    if largest >= LANGUAGE_ITEMS:
        return ""
    return (
        f"task budgets too small: at most {largest} items per task and language (a pooled effect needs "
        f"{LANGUAGE_ITEMS} a language and {MIN_ITEMS} in all)"
    )


def _findings_section(found: list, report: Report) -> Section:
    anchors = report.titles()

    def present(anchor: str) -> str:  # without a pivot by language, the metrics table holds ppl and SNR
        if anchor in anchors:
            return anchor
        return (
            ANCHORS["metrics"]
            if anchor in (ANCHORS["ppl"], ANCHORS["snr"]) and ANCHORS["metrics"] in anchors
            else ""
        )

    frame = findings_table(found).with_columns(
        pl.col("evidence").map_elements(present, return_dtype=pl.String)
    )
    return Section(
        "Findings: the paper's claims, decided",
        frame,
        ["claim"],
        note="\n".join(PROTOCOLS),
        anchor=ANCHORS["findings"],
        links=("evidence",),
    )


def _chance_section(chance: pl.DataFrame) -> Section:
    frame = chance.with_columns(
        pl.when(pl.col("informative").is_null())
        .then(pl.lit("no chance level"))
        .when(pl.col("informative"))
        .then(pl.lit("yes"))
        .otherwise(pl.lit("no: at chance"))
        .alias("informative")
    ).sort("model", "task", "eval_lang")
    return Section(
        "Which tasks can decide anything: the dense model against chance",
        frame,
        ["model", "task", "eval_lang"],
        note=f"accuracy of the dense model (the score the task's accuracy reads) against a guesser's "
        f"(chance: 1 / number of choices); p: one-sided exact binomial test; a task x language with "
        f"p >= {ALPHA} is uninformative and enters no claim",
        anchor=ANCHORS["chance"],
    )


def _pooled_section(pooled: pl.DataFrame, delta: float) -> Section:
    frame = pooled.select(
        "setting",
        "task",
        "metric",
        "verdict",
        pl.col("effect").alias("own - others"),
        pl.col("low").alias("own - others.ci_low"),
        pl.col("high").alias("own - others.ci_high"),
        pl.col("detectable"),
        pl.col("delta").fill_nan(None).alias("± delta"),  # none: no dense margins to derive it from
        pl.concat_str(
            [
                pl.col("per_language_min").round(4).cast(pl.String),
                pl.col("per_language_max").round(4).cast(pl.String),
            ],
            separator=" … ",
        ).alias("per-language range"),
        "languages",
        "items",
        "left_out",
    ).sort("setting", "task", "metric")
    return Section(
        "Pooled own-language effect per setting and task family (verdicts)",
        frame,
        ["setting", "task", "metric"],
        note=f"own - others: the score of the model calibrated on the evaluation language minus the mean "
        f"of the models calibrated on the other languages, paired on the same items, averaged over the "
        f"informative languages; (a–b) 95% bootstrap interval ({RESAMPLES:,} replicates drawing "
        f"languages, items and seeds); verdict better / worse when it excludes 0, equivalent inside "
        f"± delta (accuracy: {delta:g}), else inconclusive. " + shown_margin_note(),
        anchor=ANCHORS["pooled"],
    )


SIGNIFICANCE_NOTE = (
    f"Appendix. own - other: accuracy (higher is better) or perplexity (ppl, lower is better) of the "
    f"model calibrated on the evaluation language minus the one calibrated on `other`, paired over the "
    f"same items (documents for ppl); (a–b) its 95% interval from {RESAMPLES:,} paired bootstrap "
    f"resamples (seeded; seeds resampled too where cells have several); significant when it excludes "
    f"0; a comparison on fewer than {MIN_ITEMS} shared items is too small to test and shows no interval"
)


def significance_sections(
    pruned: pl.DataFrame, answers: pl.DataFrame, documents: pl.DataFrame
) -> tuple[list[Section], list[str]]:
    """Per setting, task and evaluation language L: calibrating on L against each other calibration
    language, and a summary line per task family (from the runs' per-item results): the report's
    appendix. Kinds (perplexity, tasks) whose every comparison is too small get one note line instead."""
    if pruned.is_empty() or "calib_lang" not in pruned.columns:
        return [], []
    settings = [p for p in SETTING_PARAMS if p in pruned.columns]
    runs = pruned.select("run_id", "calib_lang", "seed", *settings)
    found, notes = [], []
    kinds = ((documents, "nll", "perplexity"), (answers, "correct", "task"), (answers, "margin", "margin"))
    for frame, value, kind in kinds:
        if frame.is_empty() or value not in frame.columns or frame[value].null_count() == frame.height:
            continue
        joined = frame.drop_nulls(value).join(runs, on="run_id")
        tables = []
        for setting, part in joined.group_by(settings, maintain_order=True):
            compared = own_language_comparisons(part, value)
            labels = [pl.lit(v).alias(name) for name, v in zip(settings, setting, strict=True)]
            metric = {"nll": "ppl", "correct": "accuracy", "margin": "margin"}[value]
            tables.append(compared.select(*labels, pl.lit(metric).alias("metric"), pl.all()))
        table = pl.concat(tables) if tables else pl.DataFrame()
        if table.is_empty():
            continue
        if table["items"].max() < MIN_ITEMS:
            if kind == "margin":  # the task line says it
                continue
            notes.append(
                f"{kind} budgets too small to test own- against other-language calibration: at most "
                f"{table['items'].max()} shared {'documents' if kind == 'perplexity' else 'items'} per "
                f"comparison (a test needs {MIN_ITEMS})"
            )
            continue
        found.append(table)
    if not found:
        return [], notes
    table = pl.concat(found)
    small = pl.col("items") < MIN_ITEMS
    table = table.with_columns(
        pl.when(small).then(None).otherwise(pl.col("low")).alias("low"),
        pl.when(small).then(None).otherwise(pl.col("high")).alias("high"),
        pl.when(small)
        .then(pl.lit("too small"))
        .otherwise(pl.col("significant").cast(pl.String))
        .alias("test"),
    )
    varying = [p for p in settings if pruned[p].n_unique() > 1]
    key = [*varying, "task", "metric", "eval_lang", "other"]
    detail = table.select(
        *key,
        pl.col("difference").alias("own - other"),
        pl.col("low").alias("own - other.ci_low"),
        pl.col("high").alias("own - other.ci_high"),
        pl.col("test").alias("significant"),
        pl.col("items"),
    ).sort(key)
    lines = pl.concat(
        [
            summary(part.with_columns(_task_and_metric())).select(
                *[pl.lit(v).alias(k) for k, v in zip(varying, group, strict=True)], pl.all()
            )
            for group, part in (table.group_by(varying, maintain_order=True) if varying else [((), table)])
        ]
    )
    return [
        Section(
            "Appendix: own-language calibration against each other calibration language (paired bootstrap)",
            detail,
            key,
            note=SIGNIFICANCE_NOTE,
            anchor=ANCHORS["pairs"],
        ),
        Section(
            "Appendix: does calibrating on the evaluation language win each pair? (per task family)",
            lines.select(*varying, "task", "line", "languages", "wins", "losses").sort([*varying, "task"]),
            [*varying, "task", "line"],
            note="wins: significantly better than every other calibration language; losses: significantly "
            "worse than at least one (comparisons on too few items count as neither)",
        ),
    ], notes


def _task_and_metric() -> pl.Expr:
    """The summary's task label: the family, and 'margin' for its margin comparisons."""
    margin = pl.col("metric") == "margin"
    return pl.when(margin).then(pl.col("task") + " (margin)").otherwise(pl.col("task")).alias("task")


def _runs_note(frame: pl.DataFrame) -> str:
    seeds = sorted(frame["seed"].unique().to_list()) if "seed" in frame.columns else []
    return f"{frame.height} runs; seeds {', '.join(map(str, seeds))}" if seeds else f"{frame.height} runs"


def _pivot_sections(
    body: pl.DataFrame,
    dense: pl.DataFrame,
    key: list[str],
    family: str,
    columns: list[str],
    config: ReportConfig,
) -> list[Section]:

    best = "min" if family in ("ppl", "bpb") else "max"
    if config.pivot == EVAL_LANG:
        index = list(dict.fromkeys([*key, *(["model"] if "model" in body.columns else [])]))
        long = _by_language(body, index, columns).drop_nulls(EVAL_LANG)
        if family in (
            "acc",
            "margin",
        ):  # one score per language would mix tasks: the task family joins the key
            key = [*key, "task"]
        else:
            long = long.drop("task")
        pivot_column = EVAL_LANG
    else:
        if config.pivot not in body.columns:
            raise CpsError(f"cannot pivot on {config.pivot!r}: use eval_lang or a param of the runs")
        key = [k for k in key if k != config.pivot]
        long = body.select(*key, config.pivot, *columns).unpivot(
            index=[*key, config.pivot], on=columns, variable_name="metric", value_name="value"
        )
        key = [*key, "metric"]
        pivot_column = config.pivot
    wide = _wide(long, key, pivot_column)
    diagonal = "calib_lang" if pivot_column == EVAL_LANG and "calib_lang" in key else None
    title = f"{family} by {' x '.join(key)} (rows) and {pivot_column} (columns), mean ± std"
    note = NOTES.get(family, INTERVAL_NOTE if "ci_low" in long.columns else "")
    anchor = ANCHORS.get(family, "") if pivot_column == EVAL_LANG else ""
    sections = [
        Section(title, wide, key, note=note, best=best, diagonal=diagonal, heatmap=True, anchor=anchor)
    ]
    if family in ("ppl", "bpb") and pivot_column == EVAL_LANG and not dense.is_empty():
        change = _change_vs_dense(long, dense, key, family)
        if change is not None:
            sections.append(
                Section(
                    f"{family} change against the dense baseline (%), by {' x '.join(key)} and {EVAL_LANG}",
                    change,
                    key,
                    note="(pruned / dense - 1) x 100, dense = the method=dense run of the same model",
                    best=best,
                    diagonal=diagonal,
                    heatmap=True,
                )
            )
    return sections


def _by_language(frame: pl.DataFrame, index: list[str], columns: list[str]) -> pl.DataFrame:
    """Metric columns as rows (metric, value) with the language and task family each names, and
    the metric's interval (ci_low, ci_high) where the runs logged one."""
    keys = list(dict.fromkeys(["run_id", *index]))
    long = frame.select(*keys, *columns).unpivot(
        index=keys, on=columns, variable_name="metric", value_name="value"
    )
    for bound in INTERVAL:
        sources = {c: _bound_column(c, bound) for c in columns if _bound_column(c, bound) in frame.columns}
        if sources:
            bounds = (
                frame.select(*keys, *sources.values())
                .rename({source: column for column, source in sources.items()})
                .unpivot(index=keys, on=list(sources), variable_name="metric", value_name=bound)
            )
            long = long.join(bounds, on=[*keys, "metric"], how="left", nulls_equal=True)
    return (
        long.drop_nulls("value")
        .with_columns(
            pl.col("metric").map_elements(_lang, return_dtype=pl.String).alias(EVAL_LANG),
            pl.col("metric").map_elements(_family, return_dtype=pl.String).alias("task"),
        )
        .drop([] if "run_id" in index else ["run_id"])
    )


def _wide(long: pl.DataFrame, key: list[str], pivot_column: str) -> pl.DataFrame:
    """Columns per pivot value v: v (mean), v.std and, with intervals, v.ci_low and v.ci_high
    (the mean of the runs' bounds)."""
    bounds = [bound for bound in INTERVAL if bound in long.columns]
    stats = long.group_by(*key, pivot_column).agg(
        pl.col("value").mean().alias("mean"),
        pl.col("value").std().fill_null(0.0).alias("std"),
        *[pl.col(bound).mean() for bound in bounds],
    )
    values = sorted(stats[pivot_column].unique().to_list())
    wide = stats.pivot(on=pivot_column, index=key, values="mean")
    suffixes = ["std", *bounds]
    for suffix in suffixes:
        part = stats.pivot(on=pivot_column, index=key, values=suffix)
        wide = wide.join(part.rename({v: f"{v}.{suffix}" for v in values}), on=key, nulls_equal=True)
    columns = [c for v in values for c in (v, *(f"{v}.{suffix}" for suffix in suffixes))]
    return wide.select(*key, *columns).sort(key)


def _change_vs_dense(
    long: pl.DataFrame, dense: pl.DataFrame, key: list[str], family: str
) -> pl.DataFrame | None:
    columns = [c for c in dense.columns if c.startswith(f"m:{family}.")]
    if not columns or "model" not in dense.columns or "model" not in long.columns:
        return None
    base = (
        dense.select("model", *columns)
        .unpivot(index="model", on=columns, variable_name="metric", value_name="dense")
        .drop_nulls("dense")
        .group_by("model", "metric")
        .agg(pl.col("dense").mean())
    )
    joined = long.join(base, on=["model", "metric"], how="inner")
    if joined.is_empty():
        return None
    joined = joined.with_columns(((pl.col("value") / pl.col("dense") - 1) * 100).alias("value"))
    return _wide(joined.drop("dense"), key, EVAL_LANG)


def _task_section(body: pl.DataFrame, columns: list[str]) -> Section:
    index = [k for k in ("method",) if k in body.columns]
    long = _by_language(body, index, columns).with_columns(pl.col(EVAL_LANG).fill_null("-"))
    task_key = [*index, "task"]
    return Section(
        f"Task accuracy by {' x '.join(task_key)} and language (mean ± std over all runs of the row)",
        _wide(long, task_key, EVAL_LANG),
        task_key,
        note="acc; "
        + "; ".join(f"for {family} {score}" for family, score in SHOWN_SCORE.items())
        + " (plain acc rewards short candidates; mkqa generates). "
        + INTERVAL_NOTE,
        best="max",
        heatmap=True,
    )


def analysis_section(store: tracking.Store, filters: dict[str, str]) -> Section | None:
    """Headline numbers of the finished analysis runs (IoU, LAPE overlap, LSAR share, paper check)."""
    frame = analysis_runs(store, filters)
    if frame.is_empty():
        return None
    key = [
        "model",
        "method",
        "pattern",
        "sparsity",
        "calib_corpus",
        "vary",
        "members",
        "paper_low_iou_agrees",
    ]
    empty = [c for c in frame.columns if c not in key and frame[c].is_nan().all()]  # e.g. no OWL group
    return Section(
        "Analyses (latest per group): mask IoU, LAPE overlap, LSAR, cross-language SNR, OWL spread, "
        "removed layers",
        frame.drop(empty).sort(key[:6], nulls_last=True),
        key,
    )
