"""Every analysis on tiny constructed inputs whose answers are worked out here by hand (issue 25).

Each expected value is written as the arithmetic that gives it, so that a reader can check it
without running anything; none is computed by the function under test.
"""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from cps.analysis.cross_language import best_by_language, own_language_best
from cps.analysis.lape import LanguageNeurons, lape, neuron_overlap
from cps.analysis.lsar import language_subspace, split_deviation, split_second_moment
from cps.analysis.masks_overlap import (
    iou_headlines,
    language_pairs,
    lowest_overlap_modules,
    mask_iou,
    pairwise_iou,
    paper_agrees,
)

# --- LAPE (Tang et al., ACL 2024): entropy, the quantile filter, selection and assignment ---------

# (layers=2, neurons=3, languages=[en, sw]) activation probabilities
LAPE_PROBS = torch.tensor(
    [
        [[0.9, 0.0], [0.6, 0.6], [0.05, 0.0]],  # layer 0: en-only, both (at the bar), never fires
        [[0.7, 0.1], [0.0, 0.8], [0.2, 0.3]],  # layer 1: mostly en, sw-only, both (below the bar)
    ]
)


def test_lape_entropy_threshold_and_assignment_by_hand():
    # the 12 probabilities sorted: 0 0 0 .05 .1 .2 .3 .6 .6 .7 .8 .9; 0.75 quantile = 9th (12*0.75)
    found = lape(LAPE_PROBS, ["en", "sw"], ratio=0.5, filter_quantile=0.75)
    assert found.threshold == pytest.approx(0.6)
    # normalised across languages: (0.9, 0) -> (1, 0); (0.7, 0.1) -> (7/8, 1/8); (0, 0.8) -> (0, 1)
    assert found.entropy[0, 0].item() == pytest.approx(0.0)  # -(1 ln 1)
    assert found.entropy[1, 0].item() == pytest.approx(-(7 / 8 * math.log(7 / 8) + 1 / 8 * math.log(1 / 8)))
    assert found.entropy[1, 1].item() == pytest.approx(0.0)
    # no probability strictly above 0.6: (0.6, 0.6), (0.05, 0), (0.2, 0.3) are dismissed
    assert found.entropy[0, 1].item() == math.inf  # its own entropy, ln 2, is never seen
    assert found.entropy[0, 2].item() == math.inf
    assert found.entropy[1, 2].item() == math.inf
    # round(6 * 0.5) = 3 lowest entropies: (0,0) H=0, (1,1) H=0, (1,0) H=0.377
    assert sorted(map(tuple, found.selected.tolist())) == [(0, 0), (1, 0), (1, 1)]
    # assigned where the language's own probability > 0.6: en 0.9 at (0,0), 0.7 at (1,0); sw 0.8 at (1,1)
    assert sorted(map(tuple, found.assignment["en"].tolist())) == [(0, 0), (1, 0)]
    assert sorted(map(tuple, found.assignment["sw"].tolist())) == [(1, 1)]


def test_lape_ratio_counts_neurons_and_never_selects_dismissed_ones():
    # round(6 * 2/6) = 2: the two entropy-0 neurons only, the 0.377 one is left out
    two = lape(LAPE_PROBS, ["en", "sw"], ratio=2 / 6, filter_quantile=0.75)
    assert sorted(map(tuple, two.selected.tolist())) == [(0, 0), (1, 1)]
    assert sorted(map(tuple, two.assignment["en"].tolist())) == [(0, 0)]
    # ratio 0.99 -> round(5.94) = 6 asked for, but only 3 neurons pass the filter
    every = lape(LAPE_PROBS, ["en", "sw"], ratio=0.99, filter_quantile=0.75)
    assert sorted(map(tuple, every.selected.tolist())) == [(0, 0), (1, 0), (1, 1)]


def _neurons(assignment: dict[str, list[tuple[int, int]]]) -> LanguageNeurons:
    """Only `assignment` is read by `neuron_overlap`; the rest is filler."""
    sets = {lang: torch.tensor(pairs, dtype=torch.long).reshape(-1, 2) for lang, pairs in assignment.items()}
    return LanguageNeurons(torch.zeros(2, 5), torch.zeros(0, 2, dtype=torch.long), sets, 0.5)


def test_lape_overlap_and_probability_change_by_hand():
    languages = ["en", "sw", "zh", "ar"]
    dense = _neurons({"en": [(0, 0), (0, 3), (1, 2)], "sw": [(1, 1)], "zh": [], "ar": []})
    pruned = _neurons({"en": [(0, 0), (1, 2), (1, 4), (0, 1)], "sw": [], "zh": [], "ar": [(0, 2)]})
    # (layers=2, neurons=5, languages=4); every other cell moves by +0.05, so a wrong index shows
    dense_probs = torch.full((2, 5, 4), 0.5, dtype=torch.float64)
    pruned_probs = torch.full((2, 5, 4), 0.55, dtype=torch.float64)
    en, sw = 0, 1
    dense_probs[0, 0, en], pruned_probs[0, 0, en] = 0.9, 0.6  # -0.3
    dense_probs[0, 3, en], pruned_probs[0, 3, en] = 0.8, 0.8  # 0
    dense_probs[1, 2, en], pruned_probs[1, 2, en] = 0.7, 0.4  # -0.3
    dense_probs[1, 1, sw], pruned_probs[1, 1, sw] = 0.9, 0.3  # -0.6
    pruned_probs[0, 0, sw] = 0.0  # a neuron of en, read in sw: must not count for en
    table = neuron_overlap(dense, pruned, dense_probs, pruned_probs, languages)
    rows = {row["lang"]: row for row in table.iter_rows(named=True)}
    assert [rows[lang]["dense_neurons"] for lang in languages] == [3, 1, 0, 0]
    assert [rows[lang]["pruned_neurons"] for lang in languages] == [4, 0, 0, 1]
    assert rows["en"]["overlap"] == pytest.approx(2 / 5)  # {(0,0),(1,2)} of 5 distinct neurons
    assert rows["sw"]["overlap"] == pytest.approx(0 / 1)  # the one dense neuron is gone
    assert rows["zh"]["overlap"] == 1.0  # both empty: nothing changed
    assert rows["ar"]["overlap"] == pytest.approx(0 / 1)  # a new neuron, none before
    assert rows["en"]["prob_change"] == pytest.approx((-0.3 + 0 - 0.3) / 3)
    assert rows["sw"]["prob_change"] == pytest.approx(-0.6 / 1)
    # no dense neuron of the language: no mean to take (not a change of 0, which would count as data)
    assert rows["zh"]["prob_change"] is None and rows["ar"]["prob_change"] is None
    assert table["prob_change"].dtype == pl.Float64


# --- LSAR (Xie et al., 2022): agnostic mean, language subspace, the split of the deviation --------

# 3 languages in d=3: a shared (1, 2, 3) plus centred offsets (2,0,0), (-1,1,0), (-1,-1,0)
LSAR_MEANS = torch.tensor([[3.0, 2.0, 3.0], [0.0, 3.0, 3.0], [0.0, 1.0, 3.0]], dtype=torch.float64)


def test_lsar_subspace_by_hand():
    subspace = language_subspace(LSAR_MEANS)  # rank 3 - 1 = 2
    assert subspace.agnostic.tolist() == pytest.approx([3 / 3, 6 / 3, 9 / 3])  # column means
    # centred^T centred = diag(2^2+1+1, 0+1+1, 0) = diag(6, 2, 0): singular values sqrt 6, sqrt 2
    assert subspace.singular_values.tolist() == pytest.approx([math.sqrt(6), math.sqrt(2)])
    projector = subspace.basis @ subspace.basis.T  # the basis is e1, e2 up to sign
    assert projector.tolist() == [
        pytest.approx([1, 0, 0], abs=1e-12),
        pytest.approx([0, 1, 0], abs=1e-12),
        pytest.approx([0, 0, 0], abs=1e-12),
    ]
    rank_one = language_subspace(LSAR_MEANS, rank=1)  # the larger direction only: e1
    assert (rank_one.basis[:, 0].abs()).tolist() == pytest.approx([1, 0, 0], abs=1e-12)


def test_lsar_split_of_a_deviation_by_hand():
    deltas = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    specific, agnostic = split_deviation(deltas, language_subspace(LSAR_MEANS))
    assert specific.tolist() == pytest.approx([1**2 + 2**2, 0])  # the e1, e2 components
    assert agnostic.tolist() == pytest.approx([3**2, 2**2])  # the e3 component
    specific, agnostic = split_deviation(deltas, language_subspace(LSAR_MEANS, rank=1))
    assert specific.tolist() == pytest.approx([1**2, 0])
    assert agnostic.tolist() == pytest.approx([2**2 + 3**2, 2**2])


def test_lsar_second_moment_split_and_share_by_hand():
    # two positions, deviations (1, 2, 3) and (0, 0, 1), the same in both layers
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])
    moment = torch.outer(first, first) + torch.outer(second, second)  # C = sum delta delta^T
    noise = torch.tensor([14.0 + 1.0, 14.0 + 1.0])  # sum ||delta||^2 per layer
    subspaces = [language_subspace(LSAR_MEANS), language_subspace(LSAR_MEANS, rank=1)]
    table = split_second_moment(torch.stack([moment, moment]), noise, 2, subspaces)
    assert table.columns == ["layer", "specific", "agnostic", "specific_share"]
    assert table["layer"].to_list() == [0, 1]
    # layer 0, span(e1, e2): C11 + C22 = 1 + 4 = 5 of 15, over 2 positions
    assert table["specific"][0] == pytest.approx(5 / 2)
    assert table["agnostic"][0] == pytest.approx((15 - 5) / 2)
    assert table["specific_share"][0] == pytest.approx(5 / 15)
    # layer 1, span(e1): C11 = 1 of 15
    assert table["specific"][1] == pytest.approx(1 / 2)
    assert table["agnostic"][1] == pytest.approx((15 - 1) / 2)
    assert table["specific_share"][1] == pytest.approx(1 / 15)


def test_lsar_share_of_no_deviation_is_zero():
    table = split_second_moment(torch.zeros(1, 3, 3), torch.zeros(1), 4, [language_subspace(LSAR_MEANS)])
    assert table.row(0) == (0, 0.0, 0.0, 0.0)  # 0 / max(0, 1e-30)


# --- Mask IoU (arXiv 2408.14398, Sec. 5) ---------------------------------------------------------


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


O_PROJ, DOWN_PROJ = "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"
MASKS = {  # 2x4 masks, True = pruned
    "en": {
        O_PROJ: _mask([[1, 1, 0, 0], [1, 0, 1, 0]]),
        DOWN_PROJ: _mask([[1, 1, 1, 1], [0, 0, 0, 0]]),
        "model.layers.1.mlp.up_proj": _mask([[1, 1, 1, 1], [1, 1, 1, 1]]),  # en only: no pair
    },
    "sw": {O_PROJ: _mask([[1, 0, 0, 0], [1, 1, 1, 0]]), DOWN_PROJ: _mask([[1, 1, 1, 1], [0, 0, 0, 0]])},
    "zh": {O_PROJ: _mask([[0, 0, 1, 1], [0, 1, 0, 1]]), DOWN_PROJ: _mask([[1, 1, 0, 0], [0, 0, 0, 0]])},
}


def test_mask_iou_of_2x4_masks_by_hand():
    en, sw, zh = MASKS["en"][O_PROJ], MASKS["sw"][O_PROJ], MASKS["zh"][O_PROJ]
    assert mask_iou(en, sw) == pytest.approx(3 / 5)  # shared (0,0) (1,0) (1,2); 5 pruned in all
    assert mask_iou(en, zh) == pytest.approx(0 / 8)  # disjoint
    assert mask_iou(sw, zh) == pytest.approx(1 / 7)  # shared (1,1); 4 + 4 - 1 pruned
    assert mask_iou(MASKS["en"][DOWN_PROJ], MASKS["zh"][DOWN_PROJ]) == pytest.approx(2 / 4)


def test_pairwise_iou_and_its_aggregates_by_hand():
    table = pairwise_iou(MASKS).sort("layer", "lang_a", "lang_b")
    assert table.rows() == [
        (0, "self_attn.o_proj", "en", "sw", pytest.approx(3 / 5)),
        (0, "self_attn.o_proj", "en", "zh", pytest.approx(0 / 8)),
        (0, "self_attn.o_proj", "sw", "zh", pytest.approx(1 / 7)),
        (1, "mlp.down_proj", "en", "sw", pytest.approx(4 / 4)),
        (1, "mlp.down_proj", "en", "zh", pytest.approx(2 / 4)),
        (1, "mlp.down_proj", "sw", "zh", pytest.approx(2 / 4)),
    ]
    headlines = iou_headlines(table)
    assert headlines.keys() == {"iou.mean", "iou.self_attn.o_proj", "iou.mlp.down_proj"}
    assert headlines["iou.self_attn.o_proj"] == pytest.approx((3 / 5 + 0 + 1 / 7) / 3)  # = 26/105
    assert headlines["iou.mlp.down_proj"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)  # = 2/3
    assert headlines["iou.mean"] == pytest.approx((3 / 5 + 0 + 1 / 7 + 1 + 1 / 2 + 1 / 2) / 6)
    pairs = language_pairs(table)
    assert pairs.rows() == [
        ("en", "sw", pytest.approx((3 / 5 + 1) / 2)),  # = 4/5
        ("en", "zh", pytest.approx((0 + 1 / 2) / 2)),  # = 1/4
        ("sw", "zh", pytest.approx((1 / 7 + 1 / 2) / 2)),  # = 9/28
    ]


def _iou_frame(values: dict[str, list[float]], pairs: int = 1) -> pl.DataFrame:
    """(layer, module, lang_a, lang_b, iou): values[module][layer], the same for `pairs` pairs."""
    names = [("en", "sw"), ("en", "zh"), ("sw", "zh")][:pairs]
    rows = [
        (layer, module, a, b, iou)
        for module, by_layer in values.items()
        for layer, iou in enumerate(by_layer)
        for a, b in names
    ]
    return pl.DataFrame(rows, schema=["layer", "module", "lang_a", "lang_b", "iou"], orient="row")


def test_lowest_overlap_modules_read_the_first_third_of_the_layers():
    # six layers 0..5: the first third is layers 0 and 1 (5 // 3 = 1)
    frame = _iou_frame(
        {
            "self_attn.q_proj": [0.6, 0.8, 0.1, 0.1, 0.1, 0.1],  # early 0.7; 0.3 over all layers
            "self_attn.o_proj": [0.4, 0.5, 0.9, 0.9, 0.9, 0.9],  # early 0.45
            "mlp.up_proj": [0.5, 0.7, 0.9, 0.9, 0.9, 0.9],  # early 0.6
            "mlp.down_proj": [0.3, 0.5, 0.9, 0.9, 0.9, 0.9],  # early 0.4
        },
        pairs=2,
    )
    lowest = lowest_overlap_modules(frame)  # by early mean: 0.4, 0.45, 0.6, 0.7
    assert lowest == ["mlp.down_proj", "self_attn.o_proj"]
    assert lowest_overlap_modules(frame, count=3) == ["mlp.down_proj", "self_attn.o_proj", "mlp.up_proj"]
    assert paper_agrees(lowest)
    # three layers 0..2: the first third is layer 0 alone (2 // 3 = 0); o_proj 0.4 < up_proj 0.5
    # there, although up_proj is lower over all layers: (0.5 + 0.5 + 0) / 3 < (0.4 + 0.4 + 0.9) / 3
    late = _iou_frame({"self_attn.o_proj": [0.4, 0.4, 0.9], "mlp.up_proj": [0.5, 0.5, 0.0]})
    assert lowest_overlap_modules(late, count=1) == ["self_attn.o_proj"]


def test_paper_agrees_needs_both_modules_in_any_order():
    assert paper_agrees(["self_attn.o_proj", "mlp.down_proj"])
    assert paper_agrees(["mlp.down_proj", "self_attn.o_proj"])
    assert not paper_agrees(["mlp.down_proj", "mlp.up_proj"])  # o_proj missing
    assert not paper_agrees(["self_attn.o_proj", "self_attn.v_proj"])  # down_proj missing
    assert not paper_agrees(["self_attn.o_proj"])
    assert not paper_agrees([])
    early_up = _iou_frame({"self_attn.o_proj": [0.3, 0.9, 0.9], "mlp.up_proj": [0.2, 0.9, 0.9]})
    early_up = pl.concat([early_up, _iou_frame({"mlp.down_proj": [0.4, 0.9, 0.9]})])
    lowest = lowest_overlap_modules(early_up)  # layer 0: up 0.2, o 0.3, down 0.4
    assert lowest == ["mlp.up_proj", "self_attn.o_proj"] and not paper_agrees(lowest)


# --- Cross-language SNR: which calibration language best preserves which evaluation language -----


def _snr_frame() -> pl.DataFrame:
    """(calib_lang, eval_lang, layer, snr_db): calibrations en, sw, zh; evaluations en, sw, zh, ru."""
    snr = {  # (calib, eval): (layer 0, layer 1)
        ("en", "en"): (10, 20),  # mean 15: best for en although sw wins layer 0
        ("sw", "en"): (18, 8),  # mean 13
        ("zh", "en"): (5, 5),  # mean 5
        ("en", "sw"): (12, 12),  # mean 12: en beats sw's own calibration
        ("sw", "sw"): (9, 11),  # mean 10
        ("zh", "sw"): (1, 3),  # mean 2
        ("en", "zh"): (4, 6),  # mean 5
        ("sw", "zh"): (2, 2),  # mean 2
        ("zh", "zh"): (7, 9),  # mean 8: own best
        ("en", "ru"): (1, 1),  # ru is never a calibration language: not in the share
        ("sw", "ru"): (30, 30),
        ("zh", "ru"): (2, 2),
    }
    rows = [(c, e, layer, float(v)) for (c, e), values in snr.items() for layer, v in enumerate(values)]
    return pl.DataFrame(rows, schema=["calib_lang", "eval_lang", "layer", "snr_db"], orient="row")


def test_cross_language_snr_ranking_by_hand():
    snr = _snr_frame()
    # en: en 15 > sw 13 > zh 5 (own); sw: en 12 > sw 10 (not own); zh: zh 8 > en 5 (own); ru left out
    assert own_language_best(snr, "calib_lang") == pytest.approx(2 / 3)
    assert best_by_language(snr, "calib_lang").rows() == [
        ("en", "en"),
        ("ru", "sw"),
        ("sw", "en"),
        ("zh", "zh"),
    ]
    # another score column: the negated SNR turns every ranking round (worst calibration first)
    flipped = snr.with_columns(loss=-pl.col("snr_db"))
    assert own_language_best(flipped, "calib_lang", "loss") == pytest.approx(0 / 3)  # zh, zh, sw win
    assert best_by_language(flipped, "calib_lang", "loss")["calib_lang"].to_list() == ["zh", "en", "zh", "sw"]


def test_cross_language_share_is_nan_when_no_evaluation_language_was_varied():
    # the same numbers varied by method: no method is named like an evaluation language
    methods = {"en": "wanda", "sw": "sparsegpt", "zh": "mag"}
    by_method = _snr_frame().rename({"calib_lang": "method"}).with_columns(pl.col("method").replace(methods))
    assert math.isnan(own_language_best(by_method, "method"))
    assert best_by_language(by_method, "method").rows() == [
        ("en", "wanda"),  # 15 > 13 > 5
        ("ru", "sparsegpt"),
        ("sw", "wanda"),
        ("zh", "mag"),
    ]
