"""The tracking store -> frames: finished prune runs (params and metrics as columns) and analysis runs.

Metric names are normalised here, once: metrics logged under older names read as today's, and task
families whose accuracy to read is another metric (`flores_next`: acc_mutual_info) show it as
their `acc`, and its margin as their `margin`, intervals included.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping

import polars as pl

from cps import tracking
from cps.analysis.findings import DELTA, shown_answers
from cps.analysis.groups import calib_kind
from cps.config import FINDINGS_DELTA_TAG, run_variant
from cps.metrics import INTERVAL, MARGIN_OF, SHOWN_SCORE, companion, metric, task_family

# Prune metrics logged before the in-sample figures were named for what they are.
LEGACY_METRICS = {"snr_db.mean": "calib_snr_db.mean", "prune_error.total": "calib_error.total"}
# What runs are never averaged across (`method` reads as the variant: wanda+owl is a method of its own)
# (`calib_kind`: a single language or a recipe, derived: a recipe is never one more "other language")
SETTING_PARAMS = ("model", "method", "pattern", "sparsity", "calib_corpus", "calib_kind")
ANALYSIS_HEADLINES = (
    "iou.mean",
    "code_agreement.mean",  # quantized groups: the share of equal integer codes
    "lape.overlap.mean",
    "lsar.specific_share.mean",
    "cross_snr.own_lang_best",
    "owl.sparsity_spread.max",  # OWL groups: the largest per-layer spread of allocated sparsity
    "removed_layers.jaccard.mean",  # layer-removal groups: overlap of the removed layers
)


def matches(record: tracking.RunRecord, filters: Mapping[str, str]) -> bool:
    """A filter names a param, or a tag `cps.<key>` (e.g. study=demo for a sweep's runs)."""
    for key, value in filters.items():
        actual = record.params.get(key, record.tags.get(f"cps.{key}"))
        if actual is None or str(actual) != value:
            return False
    return True


def matching_runs(store: tracking.Store, stage: str, filters: Mapping[str, str]) -> list[tracking.RunRecord]:
    """The finished runs of a stage that match the filters, newest first."""
    return [record for record in tracking.find_runs(store, stage) if matches(record, filters)]


def prune_runs(store: tracking.Store, filters: Mapping[str, str]) -> pl.DataFrame:
    """Finished prune runs matching the filters: params and metrics as columns (metrics prefixed m:);
    `method` names the variant (`config.variant`: the method, its allocation and refinement)."""
    rows = []
    for record in matching_runs(store, "prune", filters):
        row: dict[str, object] = {"run_id": record.run_id, **record.params}
        params = record.params  # the method with its allocation and refinement: wanda+owl+dsnot
        row["method"] = run_variant(params)
        row["calib_kind"] = calib_kind(params.get("calib_lang"))
        row |= {f"m:{name}": value for name, value in _normalised(record.metrics).items()}
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    columns = sorted({key for row in rows for key in row})
    return pl.DataFrame(
        [{column: row.get(column) for column in columns} for row in rows],
        schema={c: pl.Float64 if c.startswith("m:") else pl.String for c in columns},
    )


def _normalised(metrics: Mapping[str, float]) -> dict[str, float]:
    normalised = dict(metrics)
    for old, new in LEGACY_METRICS.items():
        if old in metrics and new not in metrics:
            normalised[new] = metrics[old]
    for name, value in metrics.items():
        kind, _, task = name.partition(".")
        shown = SHOWN_SCORE.get(task_family(name))
        if shown is None:
            continue
        for read, as_ in ((shown, "acc"), (MARGIN_OF.get(shown), "margin")):
            if kind == read:
                normalised[metric(as_, task)] = value
                for bound in INTERVAL:
                    if companion(name, bound) in metrics:
                        normalised[companion(metric(as_, task), bound)] = metrics[companion(name, bound)]
    return normalised


def analysis_runs(store: tracking.Store, filters: Mapping[str, str]) -> pl.DataFrame:
    """The headline numbers of the finished analysis runs, the newest per group."""
    rows = []
    for record in matching_runs(store, "analyze", filters):
        members = json.loads(record.params.get("runs", "{}"))
        row = {
            "model": record.params.get("model"),
            "method": run_variant(record.params),
            "pattern": record.params.get("pattern"),
            "sparsity": record.params.get("sparsity"),
            "calib_corpus": record.params.get("calib_corpus"),
            "vary": record.params.get("vary"),
            "members": ",".join(sorted(members)),
            "paper_low_iou_agrees": record.tags.get("cps.paper_low_iou_agrees"),
        }
        row |= {name: record.metrics.get(name, math.nan) for name in ANALYSIS_HEADLINES}
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    identity = ["model", "method", "pattern", "sparsity", "calib_corpus", "vary", "members"]
    return pl.DataFrame(rows).unique(subset=identity, keep="first", maintain_order=True)


def item_results(store: tracking.Store, run_ids: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The per-item results of evaluated runs, long: accuracy items (run_id, task, eval_lang, item,
    correct: the correctness of the accuracy the report shows, margin: the gold choice's margin under
    that accuracy's score (null before issue 24), n_choices) and perplexity documents (run_id,
    task='ppl', eval_lang, item, nll, tokens). Runs without `items/` contribute nothing."""
    answers, documents = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for run_id in run_ids:
            folder = tracking.artifact_if_any(store, run_id, "items", scratch)
            if folder is None:  # evaluated before per-item results existed, or not evaluated
                continue
            for path in sorted(folder.glob("*.parquet")):
                frame = pl.read_parquet(path).with_columns(pl.lit(run_id).alias("run_id"))
                if path.stem.startswith("ppl_"):
                    documents.append(
                        frame.with_row_index("item").select(
                            "run_id",
                            pl.lit("ppl").alias("task"),
                            pl.lit(path.stem.removeprefix("ppl_")).alias("eval_lang"),
                            pl.col("item").cast(pl.Int64),
                            pl.col("nll").cast(pl.Float64),
                            pl.col("tokens").cast(pl.Float64),
                        )
                    )
                else:
                    shown = shown_answers(frame, path.stem)
                    if shown is not None:
                        answers.append(shown)
    return (
        pl.concat(answers) if answers else pl.DataFrame(),
        pl.concat(documents) if documents else pl.DataFrame(),
    )


def analysis_tables(
    store: tracking.Store, filters: Mapping[str, str], names: tuple[str, ...], vary: str
) -> dict[str, pl.DataFrame]:
    """Tables (`<name>.parquet`) of the newest finished analysis run by `vary` of each setting,
    each row labelled with the run's model, method, pattern and sparsity."""
    found: dict[str, list[pl.DataFrame]] = {name: [] for name in names}
    seen = set()
    with tempfile.TemporaryDirectory() as scratch:
        for record in matching_runs(store, "analyze", filters):
            params = record.params
            if params.get("vary") != vary:
                continue
            shown = {
                **params,
                "method": run_variant(params),
            }
            setting = tuple(shown.get(key) for key in SETTING_PARAMS)
            if setting in seen:
                continue
            seen.add(setting)
            labels = [
                pl.lit(value, dtype=pl.String).alias(key)
                for key, value in zip(SETTING_PARAMS, setting, strict=True)
            ]
            for name in names:
                path = tracking.artifact_if_any(store, record.run_id, f"{name}.parquet", scratch)
                if path is not None and path.is_file():
                    found[name].append(pl.read_parquet(path).select(*labels, pl.all()))
    return {name: pl.concat(frames, how="diagonal_relaxed") for name, frames in found.items() if frames}


def study_delta(store: tracking.Store, filters: Mapping[str, str]) -> float:
    """The [findings] delta of the study the filters select (study=NAME), recorded on its newest
    sweep run; DELTA otherwise."""
    name = filters.get("study")
    if name is not None:
        for record in tracking.find_runs(store, "sweep", {"study": name}):
            if FINDINGS_DELTA_TAG in record.tags:
                return float(record.tags[FINDINGS_DELTA_TAG])
    return DELTA
