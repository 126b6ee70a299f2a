"""The methods-at-equal-sparsity and recipes tables against numbers worked out by hand."""

from __future__ import annotations

import polars as pl
import pytest

from cps.report.methods import methods_frame, recipes_frame


def _runs(rows: list[tuple[str, str, str, float, float, float, float]]) -> pl.DataFrame:
    """(method, calib_lang, calib_corpus, ppl.en, ppl.sw, snr_db.en, snr_db.sw) per run."""
    return pl.DataFrame(
        [
            {
                "run_id": f"r{i}",
                "model": "m",
                "pattern": "unstructured",
                "sparsity": "0.5",
                "method": method,
                "calib_lang": lang,
                "calib_corpus": corpus,
                "m:ppl.en": en,
                "m:ppl.sw": sw,
                "m:snr_db.en": snr_en,
                "m:snr_db.sw": snr_sw,
            }
            for i, (method, lang, corpus, en, sw, snr_en, snr_sw) in enumerate(rows)
        ]
    )


def test_methods_side_by_side_by_hand():
    """wanda: own en 10 vs other (sw-calibrated) 12 -> -16.67%; own sw 20 vs 25 -> -20%: mean
    -18.33%, own best 2/2; SNR own en 9 - 7 = 2, own sw 8 - 5 = 3: mean 2.5 dB.
    wanda+owl: own en 11 vs 10 -> +10%; own sw 30 vs 24 -> +25%: 17.5%, own best 0/2.
    Dense: en 8, sw 16. wanda ppl_vs_dense: mean of 10/8, 25/16, 12/8, 20/16 - 1 = (25 + 56.25 +
    50 + 25) / 4 = 39.0625%. The recipe run (sw+en) and self-generated run stay out of this table."""
    pruned = _runs(
        [
            ("wanda", "en", "ntrex", 10, 25, 9, 5),
            ("wanda", "sw", "ntrex", 12, 20, 7, 8),
            ("wanda+owl", "en", "ntrex", 11, 24, 1, 1),
            ("wanda+owl", "sw", "ntrex", 10, 30, 1, 1),
            ("wanda", "sw+en", "ntrex", 11, 22, 8, 7),
            ("wanda", "sw", "self", 50, 50, 0, 0),
        ]
    )
    dense = _runs([("dense", "none", "none", 8, 16, 0, 0)])
    table = methods_frame(pruned, dense)
    wanda = table.filter(pl.col("method") == "wanda").row(0, named=True)
    owl = table.filter(pl.col("method") == "wanda+owl").row(0, named=True)
    assert wanda["own_ppl_change"] == pytest.approx((10 / 12 - 1 + 20 / 25 - 1) / 2 * 100)
    assert wanda["own_ppl_change.best"] == "2/2" and owl["own_ppl_change.best"] == "0/2"
    assert owl["own_ppl_change"] == pytest.approx((0.1 + 0.25) / 2 * 100)
    assert wanda["own_snr_gain_db"] == pytest.approx(2.5)
    assert wanda["ppl"] == pytest.approx((10 + 25 + 12 + 20) / 4) and wanda["runs"] == 2
    assert wanda["ppl_vs_dense"] == pytest.approx(39.0625)
    assert table["method"].to_list() == ["wanda", "wanda+owl"]  # by mean ppl: 16.75, then 18.75
    recipes = recipes_frame(pruned)
    rows = {r["recipe"]: r for r in recipes.iter_rows(named=True)}
    # sw+en on en: 11 / 10 - 1 = 10%; on sw: 22 / 20 - 1 = 10%
    assert rows["sw+en"]["vs_own"] == pytest.approx(10.0) and rows["sw+en"]["languages"] == 2
    # self-generated sw text: 50 / 10 - 1 = 400%, 50 / 20 - 1 = 150%
    assert rows["sw (self)"]["vs_own"] == pytest.approx(275.0)


def test_one_method_needs_no_methods_table():
    pruned = _runs([("wanda", "en", "ntrex", 10, 25, 9, 5), ("wanda", "sw", "ntrex", 12, 20, 7, 8)])
    assert methods_frame(pruned, pl.DataFrame()).is_empty()


def test_analyses_at_two_sparsities_are_two_rows(store):
    """The analysis headlines keep one row per setting: the same languages analysed at 50% and at
    70% (or on another corpus) are different analyses, not one newest row."""
    from cps import tracking
    from cps.report.load import analysis_runs

    for sparsity, corpus, iou in (("0.5", "ntrex", 0.8), ("0.7", "ntrex", 0.9), ("0.5", "self", 0.7)):
        params = {"model": "m", "method": "wanda", "pattern": "unstructured", "sparsity": sparsity,
                  "calib_corpus": corpus, "vary": "calib_lang", "runs": '{"en": "a", "sw": "b"}'}  # fmt: skip
        with tracking.start_run(store, "analyze", params) as run:
            run.log_metrics({"iou.mean": iou})
    rows = analysis_runs(store, {}).sort("sparsity", "calib_corpus")
    assert rows.select("sparsity", "calib_corpus", "iou.mean").rows() == [
        ("0.5", "ntrex", 0.8),
        ("0.5", "self", 0.7),
        ("0.7", "ntrex", 0.9),
    ]
