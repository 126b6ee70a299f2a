"""Which calibration language best preserves which evaluation language (arXiv 2408.14398, Sec. 5):
the SNR of each pruned model's hidden states against the dense model's, by calibration x
evaluation language, and the headline share of languages best preserved by calibrating on them."""

from __future__ import annotations

import polars as pl


def own_language_best(snr: pl.DataFrame, vary: str, value: str = "snr_db") -> float:
    """Share of the evaluation languages (among the `vary` values) whose highest mean `value` comes
    from the model calibrated on that same language; nan when no evaluation language was varied.
    `snr`: long frame with columns `vary`, eval_lang, `value` (any further columns are averaged)."""
    means = snr.group_by(vary, "eval_lang").agg(pl.col(value).mean())
    best = means.sort(value, descending=True).group_by("eval_lang").first()
    evaluated = best.filter(pl.col("eval_lang").is_in(means[vary].unique().to_list()))
    if not evaluated.height:
        return float("nan")
    return float((evaluated[vary] == evaluated["eval_lang"]).mean())


def best_by_language(snr: pl.DataFrame, vary: str, value: str = "snr_db") -> pl.DataFrame:
    """(eval_lang, `vary`): the `vary` value with the highest mean `value` per evaluation language."""
    means = snr.group_by(vary, "eval_lang").agg(pl.col(value).mean())
    best = means.sort(value, descending=True).group_by("eval_lang", maintain_order=True).first()
    return best.select("eval_lang", vary).sort("eval_lang")
