"""The report's findings: a row per claim of the paper with its verdict, and the sections that hold
the evidence (which tasks can decide anything, the pooled own-language effect). The statistics are
`cps.analysis.findings`; this module gathers their inputs from the store and lays out the tables."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from cps import tracking
from cps.analysis.findings import (
    ALPHA,
    DELTA,
    LANGUAGE_ITEMS,
    MIN_ITEMS,
    POWER_Z,
    RESAMPLES,
    Finding,
    cells_finding,
    chance_tests,
    equivalence_margin,
    iou_finding,
    lape_finding,
    lsar_finding,
    own_best_cells,
    pooled_effect,
    tasks_finding,
)
from cps.metrics import SHOWN_SCORE, metric_lang
from cps.report.load import analysis_tables

ANCHORS = {
    "findings": "findings",
    "chance": "which-tasks-decide",
    "pooled": "pooled-own-language-effect",
    "ppl": "ppl-by-language",
    "snr": "snr-by-language",
    "analyses": "analyses",
    "metrics": "metrics",
    "pairs": "appendix-pairs",
    "methods": "methods",
}
CLAIMS = (
    "1. own-language calibration gives the lowest perplexity on that language",
    "2. it gives the highest held-out SNR on that language",
    "3a. it does not consistently improve downstream tasks (accuracy)",
    "3b. it does not consistently improve downstream tasks (gold-choice margin)",
    "4. mask IoU across calibration languages is lowest in o_proj and down_proj, in early layers",
    "5. calibrating on L lowers the error inside the language-specific subspace (LSAR), not outside",
    "6. pruning changes the activation probability of language-specific neurons (LAPE)",
)
PROTOCOLS = (
    "How each row is decided (cps.analysis.findings):",
    "1, 2: per (setting, evaluation language) cell with its own calibration language and others, "
    "whether own calibration gives the lowest held-out perplexity (the highest held-out SNR); "
    "reproduced when the Wilson 95% interval of the share of such cells lies above 1/2, "
    "contradicted when below, else inconclusive.",
    "3: per setting and task family, over the evaluation languages where the dense model is above "
    f"chance (one-sided exact binomial, p < {ALPHA}), the own-language effect (own - mean of the other "
    "calibration languages, paired on shared items) pooled over languages, with a 95% interval from "
    f"{RESAMPLES:,} bootstrap replicates drawing languages, items and seeds; verdict better / worse "
    "(interval excludes 0), equivalent (inside ±delta), inconclusive. Reproduced when one verdict is "
    "equivalent or worse, contradicted when all are better. Margins: the gold choice's score minus the "
    "best other's (the score the accuracy reads), a continuous per-item measure of the same items.",
    "4: per analysis, the two modules of lowest mean IoU over the first third of the layers, and the "
    "gap between o_proj/down_proj and the other modules there (bootstrap over those layers); "
    "reproduced when they are the lowest and the gap lies below 0 in every analysis.",
    "5: per (setting, language L), the mean squared hidden-state deviation from the dense model inside "
    "the dense model's language subspace (LSAR) and outside it, own calibration against the mean of "
    "the others (relative change, bootstrap over cells); reproduced when the inside change lies below "
    "0 and the outside one within ±10% (about the same), contradicted when the inside change lies "
    "above 0 or the outside one beyond ±10%.",
    "6: the mean change, after pruning, of the activation probability of the dense model's "
    "language-specific neurons (LAPE) in their language (bootstrap over calibration x language "
    "cells); reproduced when its interval excludes 0.",
)


@dataclass(frozen=True)
class FindingsInputs:
    pruned: pl.DataFrame  # prune runs (params, m: metrics), not dense
    dense: pl.DataFrame
    answers: pl.DataFrame  # run_id, task, eval_lang, item, correct, margin, n_choices
    settings: list[str]  # the setting params that vary among the pruned runs


def setting_labels(frame: pl.DataFrame, settings: list[str]) -> pl.Expr:
    """A run's setting in words: the varying setting params joined ('wanda', 'gemma3-270m wanda')."""
    if not settings:
        return pl.col("method") if "method" in frame.columns else pl.lit("pruned")
    return pl.concat_str([pl.col(s).cast(pl.String) for s in settings], separator=" ")


def _long_metric(pruned: pl.DataFrame, kind: str, settings: list[str]) -> pl.DataFrame:
    """(setting, calib_lang, eval_lang, value) of every m:<kind>.<lang> metric of the pruned runs."""
    columns = [c for c in pruned.columns if c.startswith(f"m:{kind}.") and metric_lang(c[2:]) is not None]
    if not columns or "calib_lang" not in pruned.columns:
        return pl.DataFrame(schema={"setting": pl.String, "calib_lang": pl.String, "eval_lang": pl.String})
    return (
        pruned.with_columns(setting_labels(pruned, settings).alias("setting"))
        .select("setting", "calib_lang", *columns)
        .unpivot(index=["setting", "calib_lang"], on=columns, variable_name="metric", value_name="value")
        .drop_nulls("value")
        .with_columns(pl.col("metric").str.split(".").list.get(1).alias("eval_lang"))
        .drop("metric")
    )


def chance_frame(inputs: FindingsInputs) -> pl.DataFrame:
    """The dense model's accuracy against chance per model, task family and language."""
    if inputs.dense.is_empty() or inputs.answers.is_empty():
        return pl.DataFrame()
    dense = inputs.dense.select("run_id", "model").unique(subset="model", keep="first", maintain_order=True)
    frames = []
    for run_id, model in dense.iter_rows():
        items = inputs.answers.filter(pl.col("run_id") == run_id)
        if not items.is_empty():
            frames.append(chance_tests(items).select(pl.lit(model).alias("model"), pl.all()))
    return pl.concat(frames) if frames else pl.DataFrame()


def pooled_frame(inputs: FindingsInputs, chance: pl.DataFrame, delta: float) -> pl.DataFrame:
    """Per setting, task family and metric (accuracy, margin): the pooled own-language effect over
    the informative languages, its interval, per-language spread, detectable effect and verdict."""
    answers, pruned = inputs.answers, inputs.pruned
    if answers.is_empty() or pruned.is_empty() or "calib_lang" not in pruned.columns:
        return pl.DataFrame()
    runs = pruned.select(
        "run_id", "calib_lang", "seed", setting_labels(pruned, inputs.settings).alias("setting"), "model"
    )
    joined = answers.join(runs, on="run_id")
    rows = []
    for (setting, model, task), part in joined.group_by("setting", "model", "task", maintain_order=True):
        informative, unknown = _informative(chance, model, task)
        langs = sorted(set(part["eval_lang"].unique().to_list()) - set(informative.get(False, [])))
        dense_items = _dense_margins(inputs, model, task, langs)
        for metric, value, equivalence in (("accuracy", "correct", delta), ("margin", "margin", None)):
            if value not in part.columns or part[value].null_count() == part.height:
                continue
            if metric == "margin":
                equivalence = equivalence_margin(dense_items, delta) if dense_items else None
            pooled = pooled_effect(part.drop_nulls(value), value, langs)
            if pooled is None:
                continue
            spread = pooled.per_language.values()
            rows.append(
                {
                    "setting": setting,
                    "task": task,
                    "metric": metric,
                    "languages": ",".join(sorted(pooled.per_language)),
                    "items": pooled.items,
                    "effect": pooled.effect,
                    "low": pooled.low,
                    "high": pooled.high,
                    "per_language_min": min(spread),
                    "per_language_max": max(spread),
                    "detectable": pooled.detectable,
                    "delta": equivalence if equivalence is not None else float("nan"),
                    "verdict": pooled.verdict(equivalence if equivalence is not None else 0.0),
                    "left_out": ",".join(
                        [*(f"{lang} (at chance)" for lang in informative.get(False, [])), *pooled.too_small]
                        + ([f"{unknown}"] if unknown else [])
                    ),
                }
            )
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def _informative(chance: pl.DataFrame, model: str, task: str) -> tuple[dict[bool, list[str]], str]:
    """Languages of a model's task by whether the dense model is above chance on them."""
    if chance.is_empty():
        return {}, "no dense run: chance not tested"
    part = chance.filter((pl.col("model") == model) & (pl.col("task") == task))
    if part.is_empty():
        return {}, "no dense run: chance not tested"
    found: dict[bool, list[str]] = {}
    for lang, informative in part.select("eval_lang", "informative").iter_rows():
        found.setdefault(informative is not False, []).append(lang)
    return found, ""


def _dense_margins(inputs: FindingsInputs, model: str, task: str, langs: list[str]) -> list[float]:
    """The dense model's per-item margins of a task family in the given languages."""
    if inputs.dense.is_empty() or "margin" not in inputs.answers.columns:
        return []
    runs = inputs.dense.filter(pl.col("model") == model)["run_id"].head(1).to_list()
    items = inputs.answers.filter(
        pl.col("run_id").is_in(runs) & (pl.col("task") == task) & pl.col("eval_lang").is_in(langs)
    )
    return items["margin"].drop_nulls().to_list()


def findings(
    inputs: FindingsInputs, pooled: pl.DataFrame, analyses: dict[str, pl.DataFrame], no_tasks: str = ""
) -> list[Finding]:
    """One finding per claim (CLAIMS); `no_tasks`: why no pooled task effect exists, if none does."""
    pruned, settings = inputs.pruned, inputs.settings
    models = sorted(pruned["model"].unique().to_list()) if "model" in pruned.columns else []
    methods = sorted(pruned["method"].unique().to_list()) if "method" in pruned.columns else []
    results = []
    for index, (kind, lower) in enumerate((("ppl", True), ("snr_db", False))):
        long = _long_metric(pruned, kind, settings)
        cells = (
            own_best_cells(long, ["setting"], "value", lower) if "value" in long.columns else pl.DataFrame()
        )
        langs = sorted(cells["eval_lang"].unique().to_list()) if not cells.is_empty() else []
        covers = _covers(models, methods, langs)
        evidence = ANCHORS["ppl" if kind == "ppl" else "snr"]
        what = "held-out perplexity" if kind == "ppl" else "held-out SNR"
        results.append(cells_finding(CLAIMS[index], cells, what, evidence, covers))
    for claim, metric in ((CLAIMS[2], "accuracy"), (CLAIMS[3], "margin")):
        rows = pooled.filter(pl.col("metric") == metric) if not pooled.is_empty() else pooled
        langs = (
            sorted({lang for value in rows["languages"].to_list() for lang in value.split(",")})
            if (not rows.is_empty())
            else []
        )
        results.append(
            tasks_finding(claim, pooled, metric, ANCHORS["pooled"], _covers(models, methods, langs), no_tasks)
        )
    iou = analyses.get("iou", pl.DataFrame())
    by_setting = (
        {str(key[0]): part for key, part in iou.group_by("setting", maintain_order=True)}
        if not iou.is_empty()
        else {}
    )
    covers = _covers(models, methods, [])
    results.append(iou_finding(CLAIMS[4], by_setting, ANCHORS["analyses"], covers))
    lsar = analyses.get("lsar", pl.DataFrame())
    langs = sorted(lsar["eval_lang"].unique().to_list()) if not lsar.is_empty() else []
    results.append(
        lsar_finding(CLAIMS[5], lsar, "calib_lang", ANCHORS["analyses"], _covers(models, methods, langs))
    )
    lape = analyses.get("lape_overlap", pl.DataFrame())
    langs = sorted(lape["lang"].unique().to_list()) if not lape.is_empty() else []
    results.append(lape_finding(CLAIMS[6], lape, ANCHORS["analyses"], _covers(models, methods, langs)))
    return results


def _covers(models: list[str], methods: list[str], langs: list[str]) -> str:
    parts = [", ".join(models), ", ".join(methods)]
    if langs:
        parts.append(f"{len(langs)} languages ({', '.join(langs)})")
    return "; ".join(p for p in parts if p)


def findings_table(found: list[Finding]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "claim": f.claim,
                "verdict": f.verdict,
                "number": f.number,
                "95% interval": f.interval,
                "covers": f.covers,
                "evidence": f.evidence,
                "detectable / note": f.detail,
            }
            for f in found
        ]
    )


def gather_analyses(
    store: tracking.Store, filters: dict[str, str], settings: list[str]
) -> dict[str, pl.DataFrame]:
    """The newest analysis by calibration language of each setting: its iou, lsar and lape_overlap
    tables with a setting column (labelled as the pruned runs are)."""
    tables = analysis_tables(store, filters, ("iou", "lsar", "lape_overlap"), vary="calib_lang")
    return {
        name: frame.with_columns(setting_labels(frame, settings).alias("setting"))
        for name, frame in tables.items()
        if not frame.is_empty()
    }


def shown_margin_note() -> str:
    shown = ", ".join(f"{family}: {score}" for family, score in SHOWN_SCORE.items())
    return (
        "margin: the gold choice's score minus the best other choice's, per item, under the score the "
        f"task's accuracy reads (log-likelihood in nats; {shown}); its equivalence margin delta is the "
        f"shift that moves {DELTA:.0%} of the dense model's items across the decision boundary (the "
        f"{2 * DELTA:.0%} quantile of |margin|). detectable: the smallest effect these items detect with "
        f"80% power at two-sided 5% ({POWER_Z:.2f} x the bootstrap standard error); languages with "
        f"fewer than {LANGUAGE_ITEMS} shared items are left out, and a pooled effect on fewer than "
        f"{MIN_ITEMS} items is too small to test"
    )
