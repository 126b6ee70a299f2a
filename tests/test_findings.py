"""The findings statistics on constructed items whose answers are worked out here: the exact test
against chance, the pooled own-language effect (a plain-loop bootstrap written in this file), every
verdict, and the findings of a store filled with such items, read back from items/*.parquet."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from cps import tracking
from cps.analysis.findings import (
    DELTA,
    POWER_Z,
    above_chance_p,
    chance_tests,
    equivalence_margin,
    own_best_cells,
    pooled_effect,
    share_verdict,
    verdict,
    wins_needed,
)
from cps.report.tables import ReportConfig, build_report

LANGS = ("en", "sw", "zh")


def test_above_chance_is_the_exact_binomial_tail():
    # 6 of 10 four-way items right: P(X >= 6), X ~ Binomial(10, 1/4), summed by hand
    by_hand = sum(math.comb(10, k) * 0.25**k * 0.75 ** (10 - k) for k in range(6, 11))
    assert above_chance_p(6, [0.25] * 10) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.019727, abs=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    reference = scipy_stats.binomtest(6, 10, 0.25, alternative="greater").pvalue
    assert above_chance_p(6, [0.25] * 10) == pytest.approx(reference, rel=1e-12)
    # items with different numbers of choices: every outcome enumerated
    chances = [0.5, 0.25, 0.25, 1 / 7, 1 / 7, 0.5, 1 / 3]
    enumerated = sum(
        math.prod(p if hit else 1 - p for p, hit in zip(chances, outcome, strict=True))
        for outcome in itertools.product((0, 1), repeat=len(chances))
        if sum(outcome) >= 3
    )
    assert above_chance_p(3, chances) == pytest.approx(enumerated, rel=1e-12)
    assert above_chance_p(0, chances) == pytest.approx(1.0)


def test_chance_tests_mark_a_task_at_chance():
    rows = []
    for lang, right in (("en", 40), ("sw", 12)):  # of 60 two-way items: en far above 30, sw below
        rows += [
            {"task": "xcopa", "eval_lang": lang, "item": i, "correct": float(i < right), "n_choices": 2}
            for i in range(60)
        ]
    table = chance_tests(pl.DataFrame(rows))
    en, sw = table.sort("eval_lang").iter_rows(named=True)
    assert en["informative"] and not sw["informative"]
    assert en["p"] == pytest.approx(sum(math.comb(60, k) for k in range(40, 61)) / 2**60, rel=1e-9)
    assert en["chance"] == 0.5 and en["accuracy"] == pytest.approx(40 / 60)


def _items(effects: dict[str, float], items: int, seed: int, noise: float = 0.3) -> pl.DataFrame:
    """Accuracy items of 3 calibration languages x 3 evaluation languages: a shared base of 0/1
    answers, each calibration's answers flipped on a `noise` share of items, and own calibration
    made right on `effects[lang]` of the items more (or wrong, when negative)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lang in LANGS:
        base = rng.random(items) < 0.5
        for calib in LANGS:
            answers = base ^ (rng.random(items) < noise)
            if calib == lang:
                change = effects.get(lang, 0.0)
                chosen = rng.random(items) < abs(change) * 2
                answers = answers | chosen if change > 0 else answers & ~chosen
            rows += [
                {"calib_lang": calib, "seed": 0, "eval_lang": lang, "item": i, "correct": float(a)}
                for i, a in enumerate(answers)
            ]
    return pl.DataFrame(rows)


def _by_hand(frame: pl.DataFrame, resamples: int, seed: int) -> tuple[float, float, float]:
    tables = {}
    for lang in LANGS:
        part = frame.filter(pl.col("eval_lang") == lang)
        tables[lang] = {
            calib: part.filter(pl.col("calib_lang") == calib).sort("item")["correct"].to_numpy()
            for calib in LANGS
        }
    return _pooled_by_hand(tables, resamples, seed)


def _pooled_by_hand(
    tables: dict[str, dict[str, np.ndarray]], resamples: int, seed: int
) -> tuple[float, float, float]:
    """The pooled effect and its percentile interval, with a plain loop: per replicate draw the
    languages, then per drawn language its items (one draw for every calibration language).
    `tables`: evaluation language -> calibration language -> per-item scores."""
    rng = np.random.default_rng(seed)
    langs = sorted(tables)

    def effect(lang: str, items: np.ndarray) -> float:
        own = tables[lang][lang][items].mean()
        others = [scores[items].mean() for calib, scores in tables[lang].items() if calib != lang]
        return own - sum(others) / len(others)

    n = {lang: len(tables[lang][lang]) for lang in langs}
    observed = sum(effect(lang, np.arange(n[lang])) for lang in langs) / len(langs)
    replicates = []
    for _ in range(resamples):
        drawn = [langs[i] for i in rng.integers(0, len(langs), len(langs))]
        replicates.append(sum(effect(lang, rng.integers(0, n[lang], n[lang])) for lang in drawn) / len(langs))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return observed, float(low), float(high)


@pytest.mark.parametrize(
    ("effects", "items", "noise", "expected"),
    [
        ({"en": 0.15, "sw": 0.12, "zh": 0.18}, 300, 0.3, "better"),
        ({"en": -0.15, "sw": -0.12, "zh": -0.18}, 300, 0.3, "worse"),
        ({}, 600, 0.02, "equivalent"),
        ({"en": 0.05, "sw": -0.05}, 40, 0.4, "inconclusive"),
    ],
)
def test_pooled_effect_and_each_verdict(effects, items, noise, expected):
    frame = _items(effects, items, seed=len(expected), noise=noise)
    pooled = pooled_effect(frame, "correct", resamples=3000, seed=1)
    observed, low, high = _by_hand(frame, resamples=3000, seed=7)
    assert pooled.effect == pytest.approx(observed, abs=1e-12)  # the same items: exactly
    # two bootstraps with different random draws: equal within Monte Carlo error
    assert pooled.low == pytest.approx(low, abs=0.012) and pooled.high == pytest.approx(high, abs=0.012)
    assert pooled.verdict(DELTA) == expected
    assert set(pooled.per_language) == set(LANGS) and pooled.items == 3 * items
    assert pooled.detectable == pytest.approx(POWER_Z * pooled.se) and pooled.se > 0


def test_verdict_rules_and_their_edges():
    assert verdict(0.001, 0.05, DELTA) == "better"
    assert verdict(-0.05, -0.001, DELTA) == "worse"
    assert verdict(-0.019, 0.019, DELTA) == "equivalent"
    assert verdict(-0.021, 0.01, DELTA) == "inconclusive"
    assert verdict(0.005, 0.015, DELTA) == "better"  # above 0 comes first, even inside ±delta


def test_too_few_items_are_never_tested():
    assert pooled_effect(_items({"en": 0.4}, 9, seed=3), "correct", resamples=200) is None  # 9 a language
    pooled = pooled_effect(_items({"en": 0.4}, 10, seed=3), "correct", resamples=200)  # 30 in all
    assert pooled is not None and pooled.items == 30
    assert pooled_effect(_items({"en": 0.4}, 10, seed=3), "correct", ["en", "sw"], resamples=200) is None


def test_share_verdicts_by_hand():
    # Wilson interval of 12/14: centre (p + z^2/2n)/(1 + z^2/n), worked out: 0.6006 ... 0.9599
    assert share_verdict(12, 14)[0] == "reproduced"
    assert share_verdict(12, 14)[1] == pytest.approx(0.6006, abs=1e-3)
    assert share_verdict(7, 14)[0] == "inconclusive"
    assert share_verdict(1, 14)[0] == "contradicted"
    assert wins_needed(14) == 11  # 10/14: low 0.4536; 11/14: low 0.5241
    cells = own_best_cells(
        pl.DataFrame(
            {
                "setting": ["w"] * 4,
                "calib_lang": ["en", "sw", "en", "sw"],
                "eval_lang": ["en", "en", "sw", "sw"],
                "value": [10.0, 12.0, 30.0, 25.0],
            }
        ),
        ["setting"],
        "value",
        lower_is_better=True,
    )
    assert dict(zip(cells["eval_lang"], cells["own_best"], strict=True)) == {"en": True, "sw": True}


def test_equivalence_margin_is_the_quantile_of_dense_margins():
    margins = [(-1) ** i * i / 100 for i in range(1, 101)]  # |m| = 0.01 ... 1.00
    assert equivalence_margin(margins, 0.02) == pytest.approx(
        np.quantile([i / 100 for i in range(1, 101)], 0.04)
    )


def test_the_report_decides_from_the_stored_items(store, tmp_path):
    """Dense, and a method calibrated on en, sw and zh: SIB-like items (7 choices) where own
    calibration is better by ~15 points in en and zh; the dense model is at chance in sw, so sw
    enters no claim."""
    rng = np.random.default_rng(5)
    n = 120
    dense_right = {"en": rng.random(n) < 0.6, "sw": rng.random(n) < 1 / 7, "zh": rng.random(n) < 0.6}
    dense_right["sw"][:] = False
    dense_right["sw"][: n // 7 - 2] = True  # just below chance's expectation
    frames = {}

    def log(params: dict, right: dict[str, np.ndarray], margins: dict[str, np.ndarray], ppl: dict) -> None:
        with tracking.start_run(store, "prune", params) as run:
            run.log_metrics({f"ppl.{lang}": value for lang, value in ppl.items()})
            items = {}
            for lang in LANGS:
                items[f"items/sib_{lang}.parquet"] = pl.DataFrame(
                    {
                        "task": f"sib_{lang}",
                        "item": range(n),
                        "lang": lang,
                        "choices": [["a", "b", "c", "d", "e", "f", "g"]] * n,
                        "acc": right[lang].astype(float),
                        "margin": margins[lang],
                    }
                )
            run.log_frames(items)
            frames[params.get("calib_lang", "dense")] = items

    common = {"model": "tiny-llama", "pattern": "unstructured", "seed": "0"}
    dense_margins = {lang: rng.normal(0, 1, n) for lang in LANGS}
    log(
        {**common, "method": "dense", "sparsity": "0.0"}, dense_right, dense_margins, {x: 10.0 for x in LANGS}
    )
    for calib in LANGS:
        right, margins = {}, {}
        for lang in LANGS:
            answers = dense_right[lang] ^ (rng.random(n) < 0.1)
            margin = dense_margins[lang] + rng.normal(0, 0.1, n)
            if calib == lang:
                answers = answers | (rng.random(n) < 0.3)
                margin = margin + 0.5
            right[lang], margins[lang] = answers, margin
        ppl = {lang: 20.0 if lang == calib else 25.0 for lang in LANGS}
        log({**common, "method": "wanda", "sparsity": "0.5", "calib_lang": calib}, right, margins, ppl)

    report = build_report(store, ReportConfig(pivot="eval_lang", metrics=("ppl", "acc")))
    assert report.sections[0].title.startswith("Findings")
    chance = next(s for s in report.sections if s.title.startswith("Which tasks")).frame
    marks = dict(zip(chance["eval_lang"], chance["informative"], strict=True))
    assert marks == {"en": "yes", "sw": "no: at chance", "zh": "yes"}
    pooled = next(s for s in report.sections if s.title.startswith("Pooled")).frame
    accuracy = pooled.filter(pl.col("metric") == "accuracy").row(0, named=True)
    assert accuracy["languages"] == "en,zh" and "sw (at chance)" in accuracy["left_out"]
    # recomputed here from the stored items (items/*.parquet read by polars): own - mean(others)
    # per language, the mean over en and zh, and the interval by the plain-loop bootstrap
    stored = {}
    for calib in LANGS:
        run_id = next(r.run_id for r in tracking.find_runs(store, "prune", {"calib_lang": calib}))
        folder = tracking.download_artifact(store, run_id, "items", tmp_path / calib)
        stored[calib] = {lang: pl.read_parquet(folder / f"sib_{lang}.parquet") for lang in LANGS}
    for metric, column in (("accuracy", "acc"), ("margin", "margin")):
        row = pooled.filter(pl.col("metric") == metric).row(0, named=True)
        tables = {
            lang: {calib: stored[calib][lang][column].to_numpy() for calib in LANGS} for lang in ("en", "zh")
        }
        effect, low, high = _pooled_by_hand(tables, resamples=2000, seed=3)
        assert row["own - others"] == pytest.approx(effect, abs=1e-12)
        width = high - low
        assert row["own - others.ci_low"] == pytest.approx(low, abs=0.08 * width)
        assert row["own - others.ci_high"] == pytest.approx(high, abs=0.08 * width)
        assert row["verdict"] == "better" and row["own - others.ci_low"] > 0
    margin = pooled.filter(pl.col("metric") == "margin").row(0, named=True)
    assert margin["own - others"] == pytest.approx(0.5, abs=0.05)
    # the margin's equivalence delta: the 4% quantile of the dense model's |margin| in en and zh
    dense_abs = np.abs(np.concatenate([dense_margins["en"], dense_margins["zh"]]))
    assert margin["± delta"] == pytest.approx(float(np.quantile(dense_abs, 2 * DELTA)))
    found = {row["claim"][:2]: row for row in report.sections[0].frame.iter_rows(named=True)}
    assert found["1."]["verdict"] == "inconclusive"  # 3 of 3 cells: the interval still reaches 1/2
    assert found["1."]["number"].startswith("own best in 3 of 3")
    assert found["3a"]["verdict"] == "contradicted"  # better on the one informative task family
    assert found["3a"]["evidence"] == "pooled-own-language-effect"
    assert found["4."]["verdict"] == "no data"
    markdown = __import__("cps.report.render", fromlist=["render"]).render(report, "markdown")
    assert '<a id="pooled-own-language-effect"></a>' in markdown
    assert (
        "[Pooled own-language effect per setting and task family (verdicts)](#pooled-own-language-effect)"
        in markdown
    )


def test_a_demo_sized_budget_says_so_in_one_line_instead_of_testing(store):
    """2 items per task and language, 6 documents: nothing is tested, the report says why."""
    for calib in ("en", "sw"):
        with tracking.start_run(
            store, "prune", {"model": "tiny-llama", "method": "wanda", "calib_lang": calib, "seed": "0"}
        ) as run:
            run.log_metrics({"ppl.en": 10.0 + (calib != "en"), "ppl.sw": 10.0 + (calib != "sw")})
            items = {}
            for lang in ("en", "sw"):
                items[f"items/sib_{lang}.parquet"] = pl.DataFrame(
                    {"task": f"sib_{lang}", "item": [0, 1], "lang": lang, "acc": [1.0, float(calib == lang)]}
                )
                items[f"items/ppl_{lang}.parquet"] = pl.DataFrame(
                    {
                        "document": [f"d{i}" for i in range(6)],
                        "nll": [30.0] * 6,
                        "tokens": [20] * 6,
                        "bytes": [80] * 6,
                    }
                )
            run.log_frames(items)
    report = build_report(store, ReportConfig(pivot="eval_lang", metrics=("ppl",)))
    assert report.notes == [
        "perplexity budgets too small to test own- against other-language calibration: at most 6 shared "
        "documents per comparison (a test needs 30)",
        "task budgets too small to test own- against other-language calibration: at most 2 shared items "
        "per comparison (a test needs 30)",
    ]
    assert not any(s.title.startswith("Appendix") for s in report.sections)
    found = {row["claim"][:2]: row for row in report.sections[0].frame.iter_rows(named=True)}
    assert found["3a"]["verdict"] == "inconclusive"
    assert found["3a"]["detectable / note"].startswith("task budgets too small: at most 2 items")
    assert found["1."]["number"] == "own best in 2 of 2 cells (100%)"


def test_the_dry_run_estimate_counts_the_studys_own_work(tmp_path, monkeypatch):
    """The estimate is the measured rates times the work counted from the study's data, by hand."""
    from cps.data import get_corpus
    from cps.evaluation.tasks import SIB_TOPICS, _sib_items
    from cps.models import load_tokenizer
    from cps.stages import estimate
    from cps.study import parse_study

    raw = {
        "grid": {"models": ["tiny-llama"], "methods": ["wanda", "sparsegpt"], "calib_langs": ["sw", "zh"]},
        "calibration": {"nsamples": 4, "seqlen": 64},
        "eval": {"langs": ["sw", "zh"], "tasks": ["sib"], "max_docs": 2, "task_limits": {"sib": 15}},
        "analyze": {"activations": True, "langs": ["sw", "zh"], "max_docs": 1},
        "findings": {"delta": 0.03},
    }
    study = parse_study(raw)
    assert study.findings_delta == 0.03
    rates = estimate.Rates(decoder_s=1e-3, head_s=2e-3, measured="fake")
    monkeypatch.setattr(estimate, "measured_rates", lambda model, options: rates)
    tasks = ["sib_sw", "sib_zh"]
    found = estimate.estimate_time(study, tasks)
    tokenizer = load_tokenizer("tiny-llama")
    flores = get_corpus("flores", None)

    def length(text: str, special: bool = True) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    held_out = sum(length(doc.text) for lang in ("sw", "zh") for doc in flores.documents(lang)[:2])
    positions = scored = 0
    for lang in ("sw", "zh"):
        for item in _sib_items(lang, None)["test"][:15]:
            positions += length(f"Text: {item['text']}\nTopic:")
            scored += 1  # the prompt's last state predicts every topic's first token
            for topic in SIB_TOPICS:
                positions += length(" " + topic, special=False)
                scored += length(" " + topic, special=False) - 1
    costs = estimate.COSTS
    per_eval = (
        costs["eval_fixed_s"]
        + costs["held_out"] * held_out * (1e-3 + 2e-3)
        + costs["task"] * (positions * 1e-3 + scored * 2e-3)
    )
    assert found.eval_s == pytest.approx(5 * per_eval)  # dense + 2 methods x 2 languages
    passes = costs["prune_passes"]
    calib = 4 * 64 * 1e-3
    assert found.prune_s == pytest.approx(
        4 * costs["prune_fixed_s"] + 2 * passes["wanda"] * calib + 2 * passes["sparsegpt"] * calib
    )
    analysis_tokens = sum(length(flores.documents(lang)[0].text) for lang in ("sw", "zh"))
    per_group = costs["analysis_fixed_s"] + costs["analysis"] * 3 * analysis_tokens * 1e-3
    assert found.analyses_s == pytest.approx(2 * per_group)  # one group per method, 2 members + dense
    (power,) = estimate.task_power(study, tasks)
    v, tau2 = estimate.PLANNING.get("sib", estimate.PLANNING["default"])
    assert (power.items, power.languages) == (15, 2)
    assert power.detectable == pytest.approx(POWER_Z * math.sqrt(v / 30 + tau2 / 2))
    few = parse_study({**raw, "eval": {**raw["eval"], "task_limits": {"sib": 9}}})
    assert estimate.task_power(few, tasks)[0].detectable is None  # under 10 a language: not tested


def test_findings_delta_is_checked_and_reaches_the_report(store, tmp_path):
    from cps.config import FINDINGS_DELTA_TAG
    from cps.errors import CpsError
    from cps.report.load import study_delta
    from cps.study import parse_study

    grid = {"grid": {"models": ["tiny-llama"], "methods": ["wanda"], "calib_langs": ["sw"]}}
    assert parse_study(grid).findings_delta == DELTA
    for bad in ({"delta": 0}, {"delta": 1.5}, {"delta": "x"}, {"margin": 0.1}):
        with pytest.raises(CpsError, match=r"\[findings\]"):
            parse_study({**grid, "findings": bad})
    with tracking.start_run(store, "sweep", {"study": "mine"}) as run:
        run.set_tags({FINDINGS_DELTA_TAG: 0.05})
    assert study_delta(store, {"study": "mine"}) == 0.05
    assert study_delta(store, {"study": "other"}) == DELTA and study_delta(store, {}) == DELTA


def test_claims_4_to_6_on_constructed_analyses():
    from cps.analysis.findings import iou_finding, lape_finding, lsar_finding

    modules = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    rows = [
        {"layer": layer, "module": module, "lang_a": "en", "lang_b": "sw", "iou": iou}
        for layer in range(9)
        for module in modules
        for iou in [0.5 if module.endswith(("o_proj", "down_proj")) and layer <= 2 else 0.8]
    ]
    found = iou_finding("4", {"wanda": pl.DataFrame(rows)}, "analyses", "")
    # early layers 0..2 (9 // 3): o_proj and down_proj 0.5, the others 0.8: a gap of -0.3 in every layer
    assert found.verdict == "reproduced" and "o/down - rest -0.3000" in found.number
    assert found.interval == "-0.3000…-0.3000"
    flipped = [{**row, "iou": 1.3 - row["iou"]} for row in rows]  # o_proj, down_proj now highest
    assert iou_finding("4", {"wanda": pl.DataFrame(flipped)}, "analyses", "").verdict == "contradicted"

    lsar = pl.DataFrame(
        [
            {
                "setting": "wanda",
                "calib_lang": calib,
                "eval_lang": lang,
                "layer": 0,
                "specific": s,
                "agnostic": 1.0,
            }
            for lang in ("en", "sw", "zh")
            for calib in ("en", "sw", "zh")
            for s in [0.5 if calib == lang else 1.0]
        ]
    )
    found = lsar_finding("5", lsar, "calib_lang", "analyses", "")
    # own: 0.5 inside against 1.0 for the others: -50%; outside unchanged: 0%
    assert found.verdict == "reproduced" and found.number.startswith("own vs others, 3 cells: specific -50%")
    worse = lsar.with_columns(
        pl.col("specific") * 0 + pl.when(pl.col("calib_lang") == pl.col("eval_lang")).then(2.0).otherwise(1.0)
    )
    assert lsar_finding("5", worse, "calib_lang", "analyses", "").verdict == "contradicted"
    # the agnostic error falls by 35% too: not "about the same" (outside +-10%)
    both = lsar.with_columns(
        agnostic=pl.when(pl.col("calib_lang") == pl.col("eval_lang")).then(0.65).otherwise(1.0)
    )
    assert lsar_finding("5", both, "calib_lang", "analyses", "").verdict == "contradicted"

    lape = pl.DataFrame(
        {"calib_lang": ["en", "sw"] * 4, "lang": ["en"] * 8, "overlap": [0.9] * 8, "prob_change": [0.01] * 8}
    )
    assert lape_finding("6", lape, "analyses", "").verdict == "reproduced"
    mixed = lape.with_columns(prob_change=pl.Series([0.01, -0.01] * 4))
    found = lape_finding("6", mixed, "analyses", "")
    assert found.verdict == "inconclusive" and "smallest detectable change" in found.detail
    none = lape.with_columns(prob_change=pl.lit(None, dtype=pl.Float64))  # no dense neurons at all
    assert lape_finding("6", none, "analyses", "").verdict == "no data"
