"""The paired bootstrap on constructed data whose answer is known."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cps.analysis.significance import own_language_comparisons, paired_bootstrap, summary


def test_identical_models_differ_by_nothing():
    rng = np.random.default_rng(1)
    correct = (rng.random((1, 200)) < 0.5).astype(float)
    result = paired_bootstrap({"correct": correct}, {"correct": correct.copy()}, resamples=2000)
    assert result.difference == 0 and result.low == 0 and result.high == 0 and not result.significant


def test_a_model_right_on_more_items_is_significantly_better():
    rng = np.random.default_rng(2)
    base = (rng.random(300) < 0.4).astype(float)
    better = base.copy()
    wrong = np.flatnonzero(base == 0)
    better[wrong[: int(0.6 * len(wrong))]] = 1  # right on 60% of the items the other gets wrong
    result = paired_bootstrap({"correct": better[None]}, {"correct": base[None]}, resamples=2000)
    assert result.difference == pytest.approx(better.mean() - base.mean())
    assert result.significant and 0 < result.low < result.difference < result.high
    # 3 items of 300 better: inside the noise of the items
    slightly = base.copy()
    slightly[wrong[:3]] = 1
    assert not paired_bootstrap(
        {"correct": slightly[None]}, {"correct": base[None]}, resamples=2000
    ).significant


def test_the_interval_matches_the_paired_bootstrap_written_out():
    rng = np.random.default_rng(3)
    a, b = (rng.random((1, 40)) < 0.6).astype(float), (rng.random((1, 40)) < 0.5).astype(float)
    result = paired_bootstrap({"correct": a}, {"correct": b}, resamples=4000, seed=7)
    draws = np.random.default_rng(11).integers(0, 40, size=(4000, 40))  # indices, not counts
    reference = a[0][draws].mean(1) - b[0][draws].mean(1)
    assert result.low == pytest.approx(np.percentile(reference, 2.5), abs=0.03)
    assert result.high == pytest.approx(np.percentile(reference, 97.5), abs=0.03)


def test_seed_to_seed_variance_widens_the_interval():
    """Seeds whose accuracies differ (0.3, 0.5, 0.7): the two-level bootstrap's interval is wider
    than the item-only interval of the seed-averaged answers, which hides that spread."""
    items = 400
    order = np.random.default_rng(4).permutation(items)
    seeds = np.zeros((3, items))
    for row, share in enumerate((0.3, 0.5, 0.7)):
        seeds[row, order[: int(share * items)]] = 1
    other = np.zeros((1, items))
    other[0, order[: int(0.45 * items)]] = 1
    two_level = paired_bootstrap({"correct": seeds}, {"correct": other}, resamples=4000)
    pooled = paired_bootstrap({"correct": seeds.mean(0, keepdims=True)}, {"correct": other}, resamples=4000)
    assert two_level.difference == pytest.approx(pooled.difference) == pytest.approx(0.05)
    assert two_level.high - two_level.low > 2 * (pooled.high - pooled.low)
    assert pooled.significant and not two_level.significant  # the seeds' spread swallows the gain


def test_one_item_is_never_significant():
    result = paired_bootstrap({"correct": np.ones((1, 1))}, {"correct": np.zeros((1, 1))}, resamples=100)
    assert (result.difference, result.low, result.high, result.items) == (1, 1, 1, 1)  # degenerate
    assert not result.significant


def test_perplexity_is_compared_over_documents():
    tokens = np.full((1, 50), 20.0)
    nll = np.full((1, 50), 40.0)  # ppl e^2
    lower = {"nll": nll - 4.0, "tokens": tokens}  # ppl e^1.8
    result = paired_bootstrap(lower, {"nll": nll, "tokens": tokens}, resamples=1000)
    assert result.difference == pytest.approx(np.exp(1.8) - np.exp(2.0))
    assert result.significant and result.high < 0  # lower perplexity: a negative difference


def _items(own_better_on: dict[str, int]) -> pl.DataFrame:
    """calib x eval languages en, sw on 100 items: own calibration right on `own_better_on[lang]` more."""
    rows = []
    for lang in ("en", "sw"):
        base = [1.0 if i % 2 else 0.0 for i in range(100)]
        for calib in ("en", "sw"):
            correct = list(base)
            if calib == lang:
                for i in range(0, 2 * own_better_on[lang], 2):
                    correct[i] = 1.0
            rows += [(calib, 0, "xcopa", lang, i, c) for i, c in enumerate(correct)]
    return pl.DataFrame(
        rows, schema=["calib_lang", "seed", "task", "eval_lang", "item", "correct"], orient="row"
    )


def test_own_language_comparisons_and_the_summary_line():
    comparisons = own_language_comparisons(_items({"en": 40, "sw": 0}), "correct", resamples=2000)
    assert comparisons.height == 2  # per evaluation language: own vs the other one
    en = comparisons.filter(pl.col("eval_lang") == "en").row(0, named=True)
    assert en["other"] == "sw" and en["difference"] == pytest.approx(0.4) and en["significant"]
    sw = comparisons.filter(pl.col("eval_lang") == "sw").row(0, named=True)
    assert sw["difference"] == 0 and not sw["significant"]
    (line,) = summary(comparisons)["line"].to_list()
    assert line == "own-language calibration wins significantly in 1 of 2 languages, loses significantly in 0"


def test_no_comparison_is_an_empty_frame_of_the_same_schema():
    """A setting with one calibration language so far (a sweep half done) compares nothing: its
    empty frame still stacks with the others'."""
    alone = own_language_comparisons(
        _items({"en": 0, "sw": 40}).filter(pl.col("calib_lang") == "sw"), "correct"
    )
    some = own_language_comparisons(_items({"en": 0, "sw": 40}), "correct", resamples=200)
    assert alone.is_empty() and alone.schema == some.schema
    assert pl.concat([alone, some]).height == some.height
