"""Methods at equal sparsity: does the own-language effect differ by method?

Per model, pattern and sparsity, one row per method variant (`wanda`, `wanda+owl`, `ria+dsnot`,
`shortgpt`: `config.variant`), from the runs calibrated on one language of the corpus (recipes,
mixtures and self-generated text are the second table), every figure held-out:
1. `ppl`: the mean over runs and evaluation languages of the perplexity, and `ppl_vs_dense`, the
   mean of (ppl / dense ppl - 1) x 100 over the same cells (dense: the model's dense run);
2. `own_ppl_change`: over the evaluation languages L that are also calibration languages, the mean
   of (ppl(calibrated on L) / mean over other calibration languages K of ppl(calibrated on K) - 1)
   x 100, in percent (negative: calibrating on the evaluated language is better);
3. `own_best`: in how many of those languages calibrating on L gives the lowest perplexity;
4. `snr_db` and `own_snr_gain_db`: the mean held-out SNR of the hidden states against the dense
   model's, and the mean over L of SNR(calibrated on L) - mean over K of SNR(calibrated on K).
Intervals and verdicts per method are the findings table's and the appendix's (each variant is a
setting of its own there); this table puts the methods side by side.
Recipes: per method variant and calibration recipe, the mean perplexity over the evaluation
languages against the same method's own-language calibrations (`vs_own`: mean over L of
ppl(recipe on L) / ppl(calibrated on L) - 1, in percent).
"""

from __future__ import annotations

import polars as pl

from cps.languages import LANGUAGES

# What a row compares at: the target, and the calibration's corpus and size (never averaged across)
_TARGET = ["model", "pattern", "sparsity", "calib_corpus", "nsamples", "seqlen"]


def _with_targets(frame: pl.DataFrame) -> pl.DataFrame:
    """Runs that logged no pattern, sparsity or calibration size (hand-made stores) get empty ones."""
    missing = [pl.lit("", dtype=pl.String).alias(c) for c in (*_TARGET, "method") if c not in frame.columns]
    return (frame.with_columns(missing) if missing else frame).with_columns(pl.col(_TARGET).fill_null(""))


def _single_language(frame: pl.DataFrame) -> pl.Expr:
    corpus = pl.col("calib_corpus") != "self" if "calib_corpus" in frame.columns else pl.lit(True)
    return pl.col("calib_lang").is_in(list(LANGUAGES)) & corpus


def _long(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """(run columns..., eval_lang, value) from the `m:<kind>.<lang>` columns."""
    columns = [c for c in frame.columns if c.startswith(f"m:{kind}.") and c.count(".") == 1]
    if not columns:
        return pl.DataFrame()
    keep = [c for c in dict.fromkeys(("run_id", "method", "calib_lang", *_TARGET)) if c in frame.columns]
    return (
        frame.select(*keep, *columns)
        .unpivot(columns, index=keep, variable_name="eval_lang", value_name="value")
        .with_columns(pl.col("eval_lang").str.split(".").list.last())
        .drop_nulls("value")
    )


def _own_against_others(long: pl.DataFrame, name: str, ratio: bool) -> pl.DataFrame:
    """Per target and method: the own-language change (ratio: percent; else a difference) and how
    often the own calibration is best (lowest when `ratio`, highest otherwise)."""
    key = [*_TARGET, "method"]
    own = (
        long.filter(pl.col("calib_lang") == pl.col("eval_lang"))
        .group_by(*key, "eval_lang")
        .agg(pl.col("value").mean().alias("own"))
    )
    others = (
        long.filter(pl.col("calib_lang") != pl.col("eval_lang"))
        .group_by(*key, "eval_lang")
        .agg(
            pl.col("value").mean().alias("other"),
            (pl.col("value").min() if ratio else pl.col("value").max()).alias("best_other"),
        )
    )
    paired = own.join(others, on=[*key, "eval_lang"])
    change = (pl.col("own") / pl.col("other") - 1) * 100 if ratio else pl.col("own") - pl.col("other")
    wins = pl.col("own") < pl.col("best_other") if ratio else pl.col("own") > pl.col("best_other")
    return paired.group_by(key).agg(
        change.mean().alias(name),
        (wins.sum().cast(pl.String) + "/" + pl.len().cast(pl.String)).alias(f"{name}.best"),
    )


def methods_frame(pruned: pl.DataFrame, dense: pl.DataFrame) -> pl.DataFrame:
    """The methods table (module docstring) from the report's run frames; empty when no target
    has more than one method variant."""
    if pruned.is_empty() or "calib_lang" not in pruned.columns:
        return pl.DataFrame()
    pruned, dense = _with_targets(pruned), _with_targets(dense) if not dense.is_empty() else dense
    single = pruned.filter(_single_language(pruned))
    ppl, snr = _long(single, "ppl"), _long(single, "snr_db")
    if ppl.is_empty():
        return pl.DataFrame()
    key = [*_TARGET, "method"]
    table = ppl.group_by(key).agg(
        pl.col("value").mean().alias("ppl"), pl.col("run_id").n_unique().alias("runs")
    )
    if "m:sparsity.actual" in single.columns:  # layer removal's share of weights can fall short
        actual = single.group_by(key).agg(pl.col("m:sparsity.actual").mean().alias("sparsity_actual"))
        table = table.join(actual, on=key, how="left")
    dense_ppl = _long(dense, "ppl")
    if not dense_ppl.is_empty():
        baseline = dense_ppl.group_by("model", "eval_lang").agg(pl.col("value").mean().alias("dense"))
        change = (
            ppl.join(baseline, on=["model", "eval_lang"])
            .group_by(key)
            .agg(((pl.col("value") / pl.col("dense") - 1) * 100).mean().alias("ppl_vs_dense"))
        )
        table = table.join(change, on=key, how="left")
    table = table.join(_own_against_others(ppl, "own_ppl_change", ratio=True), on=key, how="left")
    if not snr.is_empty():
        snr_mean = snr.group_by(key).agg(pl.col("value").mean().alias("snr_db"))
        table = table.join(snr_mean, on=key, how="left")
        table = table.join(_own_against_others(snr, "own_snr_gain_db", ratio=False), on=key, how="left")
    several = table.group_by(_TARGET).agg(pl.len().alias("variants")).filter(pl.col("variants") > 1)
    return table.join(several.select(_TARGET), on=_TARGET).sort([*_TARGET, "ppl"])


def recipes_frame(pruned: pl.DataFrame) -> pl.DataFrame:
    """Per method variant and calibration recipe (a mixture, a named recipe, self-generated text):
    mean perplexity over the evaluation languages, and against the own-language calibrations."""
    if pruned.is_empty() or "calib_lang" not in pruned.columns:
        return pl.DataFrame()
    ppl = _long(_with_targets(pruned), "ppl")
    if ppl.is_empty():
        return pl.DataFrame()
    if "calib_corpus" not in ppl.columns:
        ppl = ppl.with_columns(pl.lit("").alias("calib_corpus"))
    single = pl.col("calib_lang").is_in(list(LANGUAGES)) & (pl.col("calib_corpus") != "self")
    key = [*(c for c in _TARGET if c != "calib_corpus"), "method"]  # self-generated text: a recipe
    own = ppl.filter(single & (pl.col("calib_lang") == pl.col("eval_lang"))).group_by(*key, "eval_lang")
    own = own.agg(pl.col("value").mean().alias("own"))
    recipes = ppl.filter(~single)
    if recipes.is_empty():
        return pl.DataFrame()
    label = pl.col("calib_lang") + pl.when(pl.col("calib_corpus") == "self").then(
        pl.lit(" (self)")
    ).otherwise(pl.lit(""))
    joined = recipes.with_columns(label.alias("recipe")).join(own, on=[*key, "eval_lang"], how="left")
    return (
        joined.group_by(*key, "recipe")
        .agg(
            pl.col("value").mean().alias("ppl"),
            ((pl.col("value") / pl.col("own") - 1) * 100).mean().alias("vs_own"),
            pl.col("own").is_not_null().sum().alias("languages"),
        )
        .sort([*key, "recipe"])
    )
