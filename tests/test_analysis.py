"""Pure analyses on hand-made and synthetic inputs with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from cps import tracking
from cps.analysis.lape import lape
from cps.analysis.lsar import language_subspace, principal_angles, split_deviation
from cps.analysis.masks_overlap import mask_iou, pairwise_iou, split_module_name
from cps.errors import CpsError


def test_iou_on_hand_made_masks():
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[True, False, True, False]])
    assert mask_iou(a, b) == pytest.approx(1 / 3)  # one shared of three pruned
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


def test_pairwise_iou_table():
    name = "model.layers.2.mlp.down_proj"
    masks = {
        "sw": {name: torch.tensor([True, True, False, False])},
        "en": {name: torch.tensor([True, False, True, False])},
        "zh": {name: torch.tensor([True, True, False, False])},
    }
    table = pairwise_iou(masks).sort(["lang_a", "lang_b"])
    assert table.columns == ["layer", "module", "lang_a", "lang_b", "iou"]
    assert table.rows() == [
        (2, "mlp.down_proj", "en", "sw", pytest.approx(1 / 3)),
        (2, "mlp.down_proj", "en", "zh", pytest.approx(1 / 3)),
        (2, "mlp.down_proj", "sw", "zh", 1.0),
    ]
    assert split_module_name("model.layers.11.self_attn.o_proj") == (11, "self_attn.o_proj")


def test_lape_recovers_planted_language_specific_neurons():
    generator = torch.Generator().manual_seed(0)
    languages = ["ar", "en", "sw", "zh"]
    probs = 0.3 + 0.2 * torch.rand(3, 500, 4, generator=generator)  # shared neurons: all languages
    planted = {(0, 7): "sw", (1, 42): "zh", (2, 99): "ar", (2, 300): "en", (0, 400): "sw"}
    for (layer, neuron), lang in planted.items():
        probs[layer, neuron] = 0.01
        probs[layer, neuron, languages.index(lang)] = 0.9
    found = lape(probs, languages, ratio=5 / 1500)
    assert {tuple(x) for x in found.selected.tolist()} == set(planted)
    for lang in languages:
        expected = {key for key, value in planted.items() if value == lang}
        assert {tuple(x) for x in found.assignment[lang].tolist()} == expected


def test_lape_dismisses_neurons_that_never_fire_much():
    probs = torch.full((1, 100, 2), 0.5)
    probs[0, 3] = torch.tensor([0.001, 0.0])  # lowest entropy, but never above the quantile
    probs[0, 5] = torch.tensor([0.9, 0.1])
    found = lape(probs, ["en", "sw"], ratio=0.01)
    assert found.selected.tolist() == [[0, 5]]
    assert found.entropy[0, 3] == float("inf")


def test_lsar_recovers_a_planted_language_subspace():
    generator = torch.Generator().manual_seed(1)
    d, languages, rank = 64, 7, 6
    planted, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator, dtype=torch.float64))
    shared = torch.randn(d, generator=generator, dtype=torch.float64) * 5
    coefficients = torch.randn(languages, rank, generator=generator, dtype=torch.float64) * 3
    coefficients -= coefficients.mean(0)  # language identity only, no shared offset
    means = shared + coefficients @ planted.T  # (languages, d)
    subspace = language_subspace(means)
    assert subspace.basis.shape == (d, rank)
    assert torch.allclose(subspace.agnostic, shared, atol=1e-10)
    assert principal_angles(subspace.basis, planted).max() < 1e-6
    inside = planted @ torch.randn(rank, generator=generator, dtype=torch.float64)
    outside = torch.randn(d, generator=generator, dtype=torch.float64)
    outside -= planted @ (planted.T @ outside)
    specific, agnostic = split_deviation(torch.stack([inside, outside]), subspace)
    assert specific[0] == pytest.approx((inside**2).sum().item()) and agnostic[0] == pytest.approx(
        0, abs=1e-9
    )
    assert specific[1] == pytest.approx(0, abs=1e-9) and agnostic[1] == pytest.approx(
        (outside**2).sum().item()
    )
    with pytest.raises(ValueError):
        language_subspace(means, rank=7)


def test_groups_ignore_runs_that_differ_in_anything_but_the_varied_param():
    from cps.analysis.groups import comparison_groups

    base = {"model": "m", "method": "wanda", "sparsity": "0.5", "seed": "0", "git_sha": "a"}
    runs = [
        ("r1", {**base, "calib_lang": "sw"}),
        ("r2", {**base, "calib_lang": "en", "git_sha": "b"}),  # provenance does not split
        ("r3", {**base, "calib_lang": "zh", "seed": "42"}),  # another seed: another group
        ("r4", {**base, "calib_lang": "sw"}),  # older duplicate: the newest (r1) stays
        ("r5", {**base, "calib_lang": "ar", "method": "sparsegpt"}),
    ]
    (group,) = comparison_groups(runs)
    assert group.members == {"sw": "r1", "en": "r2"}
    assert group.shared["method"] == "wanda" and "calib_lang" not in group.shared
    by_method = comparison_groups(runs, vary="method")
    assert [g.members for g in by_method] == []  # no two methods share everything else


def test_mask_overlap_of_a_group_from_the_store(store):
    from cps.analysis.masks_overlap import pairwise_iou
    from cps.analysis.plots import iou_heatmap, language_matrix
    from cps.config import AnalyzeConfig, CalibrationConfig, PruneConfig
    from cps.runs import run_masks
    from cps.stages.analyze import find_groups, run_analyze
    from cps.stages.prune import run_prune

    for lang in ("sw", "zh", "ru"):
        run_prune(
            PruneConfig(
                "tiny-llama",
                "wanda",
                CalibrationConfig("tiny-llama", lang, nsamples=4, seqlen=32),
                save_model=False,
            ),
            store,
        )
    run_prune(
        PruneConfig(
            "tiny-llama",
            "wanda",
            CalibrationConfig("tiny-llama", "sw", nsamples=4, seqlen=32, seed=1),
            save_model=False,
        ),
        store,
    )
    (group,) = find_groups(store)
    assert sorted(group.members) == ["ru", "sw", "zh"] and group.shared["seed"] == "0"
    table = pairwise_iou({lang: run_masks(store, run_id) for lang, run_id in group.members.items()})
    assert table.height == 3 * 14  # 3 language pairs x 7 linears x 2 layers
    assert table["iou"].min() > 0 and table["iou"].max() < 1  # Wanda masks move with the language
    # 50% masks of the same size: IoU = s / (2 * 0.5 - s) for a shared share s, so >= 1/3 at chance
    assert table["iou"].mean() > 1 / 3
    figure = iou_heatmap(table, "IoU")
    import polars as pl

    pairs = table.group_by("lang_a", "lang_b").agg(pl.col("iou").mean())
    assert len(figure.axes) == 2 and len(language_matrix(pairs, "iou", "IoU").axes) == 2
    (result,) = run_analyze(AnalyzeConfig(filters=(("method", "wanda"),)), store)
    record = tracking.get_run(store, result.run_id)
    assert record.stage == "analyze" and record.params["vary"] == "calib_lang"
    assert json.loads(record.params["runs"]) == group.members
    assert record.metrics["iou.mean"] == pytest.approx(table["iou"].mean())
    assert result.calib_snr.height == 3 * 14 and set(result.calib_snr["calib_lang"]) == {"ru", "sw", "zh"}
    assert len(result.lowest_modules) == 2
    with pytest.raises(CpsError, match="differ only in calib_lang"):
        run_analyze(AnalyzeConfig(filters=(("method", "sparsegpt"),)), store)


def test_activation_analyses_of_a_group(store):
    from cps.config import AnalyzeConfig, CalibrationConfig, PruneConfig
    from cps.stages.analyze import run_analyze
    from cps.stages.prune import run_prune

    runs = {}
    for lang in ("sw", "zh"):
        calibration = CalibrationConfig("tiny-gemma3", lang, nsamples=4, seqlen=32)
        runs[lang] = run_prune(
            PruneConfig(calibration.model, "wanda", calibration, save_model=False), store
        ).run_id
    config = AnalyzeConfig(activations=True, langs=("sw", "zh", "ru"), max_docs=3, seqlen=64, lape_ratio=0.05)
    (result,) = run_analyze(config, store)
    tables = result.activation_tables
    overlap = tables["lape_overlap"]
    assert overlap.height == 2 * 3 and overlap["overlap"].is_between(0, 1).all()
    cross = tables["cross_snr"]
    assert cross.height == 2 * 3 * 4 and cross["snr_db"].is_finite().all()  # 2 runs x 3 langs x 4 layers
    lsar = tables["lsar"]
    assert (lsar["specific"] >= -1e-9).all() and (lsar["agnostic"] >= -1e-9).all()
    counts = tables["lape_counts"]
    assert set(counts["model"]) == {"dense", "sw", "zh"} and counts["neurons"].sum() > 0
    dense_counts = counts.filter(counts["model"] == "dense")
    assert (
        overlap.filter(overlap["calib_lang"] == "sw")["dense_neurons"].sum() == dense_counts["neurons"].sum()
    )
    assert ((lsar["specific_share"] >= 0) & (lsar["specific_share"] <= 1 + 1e-9)).all()
    # own-language share from the table by hand: eval languages sw and zh, which calib wins each
    means = {(c, e): [] for c in ("sw", "zh") for e in ("sw", "zh")}
    for calib, lang, _, snr in cross.filter(cross["eval_lang"] != "ru").iter_rows():
        means[calib, lang].append(snr)
    wins = [max(("sw", "zh"), key=lambda c: sum(means[c, e]) / len(means[c, e])) == e for e in ("sw", "zh")]
    record = tracking.get_run(store, result.run_id)
    assert record.metrics["cross_snr.own_lang_best"] == pytest.approx(sum(wins) / 2)
    assert record.metrics["lape.overlap.mean"] == pytest.approx(overlap["overlap"].mean())
    folder = tracking.local_artifact_dir(store, result.run_id, "plots")
    assert {
        "cross_snr.png",
        "lsar_specific_share.png",
        "lape_counts_dense.png",
        "calib_snr_by_calib.png",
    } <= {path.name for path in folder.iterdir()}
    for name in ("lape_overlap", "lape_counts", "cross_snr", "lsar"):
        assert tracking.local_artifact_dir(store, result.run_id, f"{name}.parquet").is_file()
    pruned = tracking.get_run(store, runs["sw"])
    assert {"lape.overlap.sw", "lape.overlap.zh", "lape.overlap.ru"} <= pruned.metrics.keys()
    with pytest.raises(CpsError, match="at least two"):
        AnalyzeConfig(activations=True, langs=("sw",))


def test_recipes_form_their_own_groups_and_old_runs_join_new_ones():
    """A recipe (sw+en, all) is never one more language of a language group; a run logged before
    allocations and refinements (neither param) groups with uniform, unrefined runs of its setting."""
    from cps.analysis.groups import comparison_groups

    base = {"model": "m", "method": "wanda", "sparsity": "0.5"}
    runs = [
        ("r1", {**base, "calib_lang": "en", "allocation": "uniform", "refine": "none"}),
        ("r2", {**base, "calib_lang": "sw"}),  # before issue 26
        ("r3", {**base, "calib_lang": "sw+en", "allocation": "uniform", "refine": "none"}),
        ("r4", {**base, "calib_lang": "all", "allocation": "uniform", "refine": "none"}),
        ("r5", {**base, "calib_lang": "zh", "allocation": "owl", "refine": "none"}),
    ]
    groups = {tuple(sorted(g.members)): g for g in comparison_groups(runs)}
    assert set(groups) == {("en", "sw"), ("all", "sw+en")}
    assert groups[("en", "sw")].shared["calib_kind"] == "language"
    assert groups[("all", "sw+en")].shared["calib_kind"] == "recipe"
