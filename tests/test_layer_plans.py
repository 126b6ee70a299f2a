"""Layer plans across calibration languages (cps.analysis.layer_plans): OWL's allocated sparsities and
the removed layers of ShortGPT, on hand-computed inputs and through `cps analyze` on tiny-gemma3."""

from __future__ import annotations

import json
import math
import tempfile

import polars as pl
import pytest

from cps.analysis.layer_plans import owl_headlines, owl_spread, removed_headlines, removed_layer_overlap

# Three languages' OWL plans over 4 layers (lambda 0.05 around 0.5). Per layer across languages:
#   layer 0: .45 .50 .55 -> mean .5,     spread .10, sd .05
#   layer 1: .50 .45 .50 -> mean .48333, spread .05, sd .05 / sqrt(3)
#   layer 2: .55 .55 .45 -> mean .51667, spread .10, sd .10 / sqrt(3)
#   layer 3: .50 .50 .50 -> mean .5,     spread 0,   sd 0
# Average ranks: sw [1, 2.5, 4, 2.5], en [2.5, 1, 4, 2.5], zh [4, 2.5, 1, 2.5]; centred on 2.5 each
# has squared norm 4.5, so rho = dot / 4.5: en-sw 2.25 / 4.5 = .5, en-zh -2.25 / 4.5 = -.5,
# sw-zh -4.5 / 4.5 = -1.
TARGETS = {
    "sw": [0.45, 0.50, 0.55, 0.50],
    "en": [0.50, 0.45, 0.55, 0.50],
    "zh": [0.55, 0.50, 0.45, 0.50],
}
RATIOS = {"sw": [9.0, 5.0, 1.0, 5.0], "en": [5.0, 9.0, 1.0, 5.0], "zh": [1.0, 5.0, 9.0, 5.0]}


def test_owl_spread_by_hand():
    spread = owl_spread(TARGETS, RATIOS)
    assert spread.layers.columns == ["lang", "layer", "sparsity", "outlier_ratio"]
    assert spread.layers.height == 12
    assert spread.layers.row(by_predicate=(pl.col("lang") == "en") & (pl.col("layer") == 1)) == (
        "en",
        1,
        0.45,
        9.0,
    )
    summary = spread.summary
    assert summary["layer"].to_list() == [0, 1, 2, 3]
    assert summary["mean"].to_list() == pytest.approx([0.5, 0.29 / 0.6, 0.31 / 0.6, 0.5])
    assert summary["min"].to_list() == pytest.approx([0.45, 0.45, 0.45, 0.5])
    assert summary["max"].to_list() == pytest.approx([0.55, 0.5, 0.55, 0.5])
    assert summary["spread"].to_list() == pytest.approx([0.1, 0.05, 0.1, 0.0])
    sds = [0.05, 0.05 / math.sqrt(3), 0.1 / math.sqrt(3), 0.0]  # deviations (1, -2, 1) / 60, (2, 2, -4) / 60
    assert summary["sd"].to_list() == pytest.approx(sds, abs=1e-12)
    pairs = spread.rank_pairs
    assert pairs.select("lang_a", "lang_b").rows() == [("en", "sw"), ("en", "zh"), ("sw", "zh")]
    assert pairs["spearman"].to_list() == pytest.approx([0.5, -0.5, -1.0])
    assert owl_headlines(spread, lam=0.05) == pytest.approx(
        {
            "owl.sparsity_spread.max": 0.1,
            "owl.sparsity_spread.max_layer": 0.0,  # layers 0 and 2 tie: the first
            "owl.sparsity_spread.mean": 0.0625,
            "owl.sparsity_spread.max_over_range": 1.0,  # 0.1 / (2 * 0.05)
            "owl.spearman.mean": -1 / 3,
        }
    )
    assert "owl.sparsity_spread.max_over_range" not in owl_headlines(spread)


def test_owl_spread_of_a_constant_plan_has_no_rank_correlation():
    """A plan with every layer at the target (equal outlier ratios) ranks nothing: NaN, left out of
    the mean; equal plans spread nothing."""
    spread = owl_spread(
        {"sw": [0.5, 0.5, 0.5], "en": [0.4, 0.5, 0.6]}, {"sw": [2.0] * 3, "en": [3.0, 2.0, 1.0]}
    )
    assert math.isnan(spread.rank_pairs["spearman"].item())
    assert "owl.spearman.mean" not in owl_headlines(spread)
    same = owl_spread({"sw": [0.4, 0.6], "en": [0.4, 0.6]}, {"sw": [2.0, 1.0], "en": [3.0, 1.0]})
    assert owl_headlines(same)["owl.sparsity_spread.max"] == 0.0
    assert owl_headlines(same)["owl.spearman.mean"] == pytest.approx(1.0)


def test_owl_spread_refuses_mismatched_series():
    with pytest.raises(ValueError, match="outlier ratios"):
        owl_spread({"sw": [0.5], "en": [0.5]}, {"sw": [1.0]})
    with pytest.raises(ValueError, match="different lengths"):
        owl_spread({"sw": [0.5, 0.5], "en": [0.5]}, {"sw": [1.0, 1.0], "en": [1.0]})


def test_removed_layer_overlap_by_hand():
    # sw {1,2,4}, en {2,4,5}, zh {2,3} of 6 layers:
    #   en-sw: shared {2,4} of {1,2,4,5} = .5; en-zh: {2} of {2,3,4,5} = .25; sw-zh: {2} of {1,2,3,4} = .25
    #   removed by: layer 0 none, 1 sw, 2 all three, 3 zh, 4 sw en, 5 en
    overlap = removed_layer_overlap({"sw": [1, 2, 4], "en": [2, 4, 5], "zh": [2, 3]}, layers=6)
    assert overlap.pairs.rows() == [
        ("en", "sw", 2, 4, 0.5),
        ("en", "zh", 1, 4, 0.25),
        ("sw", "zh", 1, 4, 0.25),
    ]
    counts = overlap.layers
    assert counts["layer"].to_list() == list(range(6))
    assert counts["removed_by"].to_list() == [0, 1, 3, 1, 2, 1]
    assert counts["share"].to_list() == pytest.approx([0, 1 / 3, 1, 1 / 3, 2 / 3, 1 / 3])
    assert counts["every"].to_list() == [False, False, True, False, False, False]
    assert counts["some"].to_list() == [False, True, True, True, True, True]
    assert overlap.grid.height == 18
    assert overlap.grid.filter(pl.col("removed")).select("lang", "layer").sort("lang", "layer").rows() == [
        ("en", 2),
        ("en", 4),
        ("en", 5),
        ("sw", 1),
        ("sw", 2),
        ("sw", 4),
        ("zh", 2),
        ("zh", 3),
    ]
    assert removed_headlines(overlap) == pytest.approx(
        {"removed_layers.jaccard.mean": 1 / 3, "removed_layers.common": 1.0, "removed_layers.some": 5.0}
    )


def test_removed_layer_overlap_edges():
    nothing = removed_layer_overlap({"sw": [], "en": []}, layers=3)
    assert nothing.pairs["jaccard"].to_list() == [1.0]  # as mask_iou: two empty sets agree
    assert removed_headlines(nothing)["removed_layers.some"] == 0.0
    disjoint = removed_layer_overlap({"sw": [0], "en": [1]}, layers=2)
    assert removed_headlines(disjoint) == {
        "removed_layers.jaccard.mean": 0.0,
        "removed_layers.common": 0.0,
        "removed_layers.some": 2.0,
    }
    with pytest.raises(ValueError, match=r"\[4\] outside the model's 4 layers"):
        removed_layer_overlap({"sw": [4], "en": [0]}, layers=4)


def test_layer_plan_figures():
    from cps.analysis.plots import layer_plan_figures

    spread = owl_spread(TARGETS, RATIOS)
    overlap = removed_layer_overlap({"sw": [1, 2, 4], "en": [2, 4, 5]}, layers=6)
    frames = {"owl_layers": spread.layers, "removed_layers": overlap.grid}
    figures = layer_plan_figures(frames, "calib_lang", "test", uniform=0.5)
    assert sorted(figures) == ["owl_allocation", "removed_layers"]
    lines = figures["owl_allocation"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["lang=en", "lang=sw", "lang=zh", "uniform 0.5"]
    assert list(lines[1].get_ydata()) == TARGETS["sw"] and lines[3].get_linestyle() == "--"
    cells = figures["removed_layers"].axes[0].get_images()[0].get_array()
    assert cells.tolist() == [[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 1, 0]]  # rows en, sw
    assert layer_plan_figures({}, "calib_lang", "test") == {}


def _table(store, run_id: str, name: str) -> pl.DataFrame:
    from cps import tracking

    with tempfile.TemporaryDirectory() as folder:
        return pl.read_parquet(tracking.download_artifact(store, run_id, f"{name}.parquet", folder))


def test_analyze_compares_owl_plans_and_removed_layers(store):
    """OWL and ShortGPT runs of tiny-gemma3 calibrated on sw and en, analysed as `cps analyze` does:
    the logged headlines and tables against the members' own series and tags."""
    from cps import tracking
    from cps.config import AnalyzeConfig, CalibrationConfig, PruneConfig
    from cps.runs import REMOVED_LAYERS_TAG
    from cps.stages.analyze import run_analyze
    from cps.stages.prune import run_prune

    for lang in ("sw", "en"):
        calibration = CalibrationConfig("tiny-gemma3", lang, nsamples=4, seqlen=32)
        run_prune(PruneConfig("tiny-gemma3", "wanda", calibration, allocation="owl", save_model=False), store)
        run_prune(PruneConfig("tiny-gemma3", "shortgpt", calibration, sparsity=0.5, save_model=False), store)
    results = {
        result.group.shared["method"]: result
        for result in run_analyze(AnalyzeConfig(group_by="calib_lang", activations=False), store)
    }
    assert sorted(results) == ["shortgpt", "wanda"]

    owl = results["wanda"]
    targets = {
        lang: tracking.metric_history(store, r, "owl.sparsity_target.layer")
        for lang, r in owl.group.members.items()
    }
    ratios = {
        lang: tracking.metric_history(store, r, "owl.outlier_ratio.layer")
        for lang, r in owl.group.members.items()
    }
    assert {len(series) for series in [*targets.values(), *ratios.values()]} == {4}  # tiny-gemma3's layers
    spreads = [max(column) - min(column) for column in zip(*targets.values(), strict=True)]
    record = tracking.get_run(store, owl.run_id)
    assert record.metrics["owl.sparsity_spread.max"] == pytest.approx(max(spreads))
    assert record.metrics["owl.sparsity_spread.mean"] == pytest.approx(sum(spreads) / 4)
    assert record.metrics["owl.sparsity_spread.max_over_range"] == pytest.approx(max(spreads) / (2 * 0.08))
    assert "iou.mean" in record.metrics  # mask IoU as for any group
    layers = _table(store, owl.run_id, "owl_layers")
    for lang in ("sw", "en"):
        rows = layers.filter(pl.col("lang") == lang).sort("layer")
        assert rows["sparsity"].to_list() == pytest.approx(targets[lang])
        assert rows["outlier_ratio"].to_list() == pytest.approx(ratios[lang])
        assert sum(targets[lang]) / 4 == pytest.approx(0.5)  # OWL keeps the model-wide target
    assert _table(store, owl.run_id, "owl_spread")["spread"].to_list() == pytest.approx(spreads)
    assert _table(store, owl.run_id, "owl_rank_pairs").select("lang_a", "lang_b").rows() == [("en", "sw")]

    removal = results["shortgpt"]
    removed = {
        lang: set(json.loads(tracking.get_run(store, r).tags[REMOVED_LAYERS_TAG]))
        for lang, r in removal.group.members.items()
    }
    assert all(len(layers) == 2 for layers in removed.values())  # int(4 * 0.5)
    jaccard = len(removed["sw"] & removed["en"]) / len(removed["sw"] | removed["en"])
    record = tracking.get_run(store, removal.run_id)
    assert record.metrics["removed_layers.jaccard.mean"] == pytest.approx(jaccard)
    assert record.metrics["removed_layers.common"] == len(removed["sw"] & removed["en"])
    assert "iou.mean" in record.metrics and "owl.sparsity_spread.max" not in record.metrics
    pairs = _table(store, removal.run_id, "removed_layer_pairs")
    assert pairs.rows() == [
        ("en", "sw", len(removed["sw"] & removed["en"]), len(removed["sw"] | removed["en"]), jaccard)
    ]
    grid = _table(store, removal.run_id, "removed_layers")
    for lang, layers_removed in removed.items():
        assert set(grid.filter((pl.col("lang") == lang) & pl.col("removed"))["layer"]) == layers_removed
    counts = _table(store, removal.run_id, "removed_layer_counts")
    assert counts["removed_by"].to_list() == [sum(i in s for s in removed.values()) for i in range(4)]
    for result, plot in ((owl, "owl_allocation"), (removal, "removed_layers")):
        with tempfile.TemporaryDirectory() as folder:
            assert (
                tracking.download_artifact(store, result.run_id, f"plots/{plot}.png", folder).stat().st_size
                > 0
            )
