"""OWL's allocation (cps/pruning/owl.py, engine.outlier_ratios) against hand-computed values and two
transcribed references (benchmarks/owl_reference.py: luuyin/OWL and llm-compressor), on tiny-gemma3
(4 layers alternating sliding and full attention; windows longer than its sliding window of 16)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from fractions import Fraction

import polars as pl
import pytest
import torch
from conftest import REPO

from cps import tracking
from cps.config import CalibrationConfig, PruneConfig
from cps.errors import CpsError
from cps.models import LoadOptions, load_model
from cps.pruning.base import get_method
from cps.pruning.engine import EngineConfig, OwlAllocation, PrunePlan, outlier_ratios, prune_model
from cps.pruning.masks import SparsityTarget
from cps.pruning.owl import FLOOR, outlier_ratio, owl_sparsities

sys.path.insert(0, str(REPO / "benchmarks"))
import owl_reference as reference

M, LAM, S = 5.0, 0.08, 0.5
NSAMPLES, SEQLEN = 8, 32


# ---------------------------------------------------------------------------------------------
# 1. Known answers


def test_outlier_ratio_counts_the_scores_of_all_linears_together():
    """Scores [[1,1,1,1],[1,1,1,10]] and [[1,20]]: mean 38/10 = 3.8. m=2: threshold 7.6, 10 and 20
    above: 2 of 10 = 20%. Per matrix, the second's threshold (2 x 10.5) would miss the 20."""
    first = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 10]])
    second = torch.tensor([[1.0, 20]])
    assert outlier_ratio([first, second], 2.0) == 20.0
    assert outlier_ratio([first, second], 3.0) == 10.0  # 11.4: only the 20
    assert outlier_ratio([torch.ones(3, 4)], 1.0) == 0.0  # strictly above: the mean itself is not


def test_outlier_ratio_equals_check_outlier_mean_on_the_concatenation():
    generator = torch.Generator().manual_seed(3)
    scores = [torch.rand(rows, 48, generator=generator) ** 6 for rows in (16, 32, 64)]
    joined = torch.cat([score.flatten() for score in scores])
    for m in (1.0, 2.0, 5.0):
        assert outlier_ratio(scores, m) == pytest.approx(reference.check_outlier_mean(joined, m), abs=1e-12)
    assert outlier_ratio(scores, 5.0) > 0


def test_owl_sparsities_known_answer():
    """D = [1, 2, 4] %, S = 0.5, lambda = 0.08: D' = (D - 1) / 3 * 0.16 = [0, 4/75, 12/75], mean
    16/225; S_l = S - D'_l + mean = [0.5 + 16/225, 0.5 + 4/225, 0.5 - 20/225]; their mean is S."""
    expected = [
        Fraction(1, 2) + Fraction(16, 225),
        Fraction(1, 2) + Fraction(4, 225),
        Fraction(1, 2) - Fraction(20, 225),
    ]
    layers = owl_sparsities([1.0, 2.0, 4.0], 0.5, 0.08)
    assert layers == pytest.approx([float(value) for value in expected], abs=1e-12)
    assert sum(layers) / 3 == pytest.approx(0.5, abs=1e-12)
    assert max(layers) - min(layers) == pytest.approx(2 * 0.08, abs=1e-12)  # the spread is 2 lambda
    assert layers == pytest.approx(reference.luuyin_rescale([1.0, 2.0, 4.0], 0.5, 0.08), abs=1e-15)


def test_owl_sparsities_floor_equal_ratios_and_a_whole_layer():
    """D = [0, 0, 10], S = 0.05: D' = [0, 0, 0.16], mean 0.16/3; the third layer would get
    0.05 - 0.16 + 0.16/3 < 0, the reference's floor 0.01 instead."""
    layers = owl_sparsities([0.0, 0.0, 10.0], 0.05, 0.08)
    assert layers == pytest.approx([0.05 + 0.16 / 3, 0.05 + 0.16 / 3, FLOOR], abs=1e-12)
    assert FLOOR == 0.01
    assert layers == pytest.approx(reference.luuyin_rescale([0.0, 0.0, 10.0], 0.05, 0.08), abs=1e-15)
    assert owl_sparsities([3.0, 3.0, 3.0], 0.6, 0.08) == [0.6, 0.6, 0.6]  # the reference divides by 0
    # D = [0, 10], S = 0.95: D' = [0, 0.16], mean 0.08: the first layer 0.95 + 0.08 = 1.03
    with pytest.raises(CpsError, match="lower --owl-lambda"):
        owl_sparsities([0.0, 10.0], 0.95, 0.08)


# ---------------------------------------------------------------------------------------------
# 2, 3. The references, transcribed, on a tiny random Gemma-3


@dataclass
class Tiny:
    """The dense tiny-gemma3, random calibration ids (8, 32), their layer-0 inputs and every layer's
    call arguments per sample (the embeddings are never pruned: they serve every copy), and the
    outlier ratios of luuyin's first loop."""

    model: torch.nn.Module
    ids: torch.Tensor
    inps: list[torch.Tensor]
    calls: list
    ratios: list[float]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    model = load_model("tiny-gemma3", LoadOptions("float32", "cpu"), tokenizer=False).model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN), generator=generator)
    inps, calls = reference.record_layer_calls(model, ids)
    return Tiny(model, ids, inps, calls, reference.luuyin_outlier_ratios(model, inps, calls, M))


def test_outlier_ratios_and_sparsities_equal_luuyin_owl(tiny):
    """cps's dense pass (all windows in one batch, sums of squares) against luuyin's first loop
    (one sample at a time, WrappedGPT's running mean; the scores differ by the factor 1/sqrt(8),
    which no ratio sees), then the allocation against its numpy rescaling."""
    ratios = outlier_ratios(tiny.model, tiny.ids, EngineConfig(), M)
    assert ratios == pytest.approx(tiny.ratios, abs=1e-6)
    assert max(ratios) - min(ratios) > 0.01  # the layers differ: the allocation is not uniform
    layers = owl_sparsities(ratios, S, LAM)
    assert layers == pytest.approx(reference.luuyin_rescale(tiny.ratios, S, LAM), abs=1e-6)


def test_engine_owl_run_equals_luuyin_owl_masks(tiny):
    """`prune_model` with the OWL plan: its layer targets are luuyin's allocation, and its masks
    are luuyin's second loop (per-row stable-sort Wanda at each layer's sparsity, statistics on the
    inputs the pruned earlier layers produce). The same transcription with layer 0 left dense
    gives layer 1 other masks: the comparison sees which inputs a layer's statistics came from."""
    allocation = reference.luuyin_rescale(tiny.ratios, S, LAM)
    pruned = copy.deepcopy(tiny.model)
    plan = PrunePlan(OwlAllocation(M, LAM))
    result = prune_model(pruned, tiny.ids, get_method("wanda"), SparsityTarget(S), plan=plan)
    assert result.outlier_ratios == pytest.approx(tiny.ratios, abs=1e-6)
    assert result.layer_targets == pytest.approx(allocation, abs=1e-6)

    masks = reference.luuyin_prune(copy.deepcopy(tiny.model), tiny.inps, tiny.calls, allocation)
    assert sorted(masks) == sorted(result.masks.keys()) and len(masks) == 4 * 7
    different = [name for name in masks if not torch.equal(masks[name], result.masks[name])]
    assert different == []
    for name, mask in masks.items():
        layer = int(name.split(".")[2])
        assert mask.sum(1).eq(int(mask.shape[1] * allocation[layer])).all(), name

    dense_first = [0.0, allocation[1], 0.0, 0.0]  # layer 1 on the dense layer 0's outputs
    alone = reference.luuyin_prune(copy.deepcopy(tiny.model), tiny.inps, tiny.calls, dense_first)
    departed = [name for name in alone if ".1." in name and not torch.equal(alone[name], masks[name])]
    assert departed, "dense inputs gave layer 1 the same masks: the comparison could not tell"


def test_llm_compressor_allocation_departs_by_the_jensen_gap(tiny):
    """llm-compressor scores |W_ij| * mean_i ||X_j^(i)|| (the mean over samples of each sample's
    column norm, up to its constant 1/128), luuyin and cps |W_ij| * sqrt(mean_i ||X_j^(i)||^2)
    (up to sqrt(N)). By Jensen the mean of norms is at most their root mean square, short of it
    by a factor that depends on how much the column's norm varies over the samples: the scores
    are reweighted column by column, so the counts above M x mean move. Here (tiny-gemma3, 8 x 32
    random ids, M = 5, lambda = 0.08) D_l ~ 0.66% moves by up to 0.03 points (~5%); the layers'
    D spread only ~0.03 points, so S_l moves by up to 0.045 of its 2 lambda = 0.16 range. Bounds:
    D within 10% of cps's, S_l within lambda. On one sample the two norms coincide (up to the
    exact factor 1/128), and so do the outlier ratios."""
    activations = reference.llmcompressor_activations(tiny.model, tiny.ids)
    ratios = reference.llmcompressor_outlier_ratios(tiny.model, activations, M)
    layers = reference.llmcompressor_rescale(ratios, S, LAM)
    cps_ratios = outlier_ratios(tiny.model, tiny.ids, EngineConfig(), M)
    cps_layers = owl_sparsities(cps_ratios, S, LAM)
    gap = max(abs(a - b) for a, b in zip(layers, cps_layers, strict=True))
    relative = max(abs(a - b) / b for a, b in zip(ratios, cps_ratios, strict=True))
    message = f"llm-compressor vs cps: max |S_l diff| {gap:.4g}, max relative D_l diff {relative:.3g}"
    assert 1e-4 < gap < LAM, message
    assert 0 < relative < 0.1, message

    one = tiny.ids[:1]
    single = reference.llmcompressor_outlier_ratios(
        tiny.model, reference.llmcompressor_activations(tiny.model, one), M
    )
    assert single == pytest.approx(outlier_ratios(tiny.model, one, EngineConfig(), M), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# 4. A tracked run


def test_owl_run_logs_its_allocation(store, monkeypatch):
    """`cps prune --allocation owl`: the logged series are EngineResult's; each linear prunes
    int(in * S_l) per row, so `sparsity.layer` is within 1/in of the layer's target; the targets'
    weight-weighted mean is the model's target."""
    import cps.stages.prune as stage

    results = []

    def recording(*args, **kwargs):
        results.append(prune_model(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(stage, "prune_model", recording)
    calibration = CalibrationConfig("tiny-gemma3", "sw", nsamples=4, seqlen=32)
    config = PruneConfig("tiny-gemma3", "wanda", calibration, allocation="owl", save_model=False)
    run = stage.run_prune(config, store)
    (result,) = results

    def series(name: str) -> list[float]:
        history = tracking.client(store).get_metric_history(run.run_id, name)
        return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]

    targets = series("owl.sparsity_target.layer")
    assert series("owl.outlier_ratio.layer") == pytest.approx(result.outlier_ratios, abs=1e-12)
    assert targets == pytest.approx(result.layer_targets, abs=1e-12)
    assert len(targets) == 4 and max(targets) - min(targets) > 0.01  # not uniform

    stats = run.stats
    for row in stats.iter_rows(named=True):
        assert row["sparsity"] == int(row["columns"] * targets[row["layer"]]) / row["columns"], row
    narrowest = stats["columns"].min()
    for target, actual in zip(targets, series("sparsity.layer"), strict=True):
        assert target - 1 / narrowest < actual <= target + 1e-12
    per_layer = stats.group_by("layer").agg((pl.col("rows") * pl.col("columns")).sum().alias("weights"))
    weights = per_layer.sort("layer")["weights"].to_list()
    mean = sum(w * t for w, t in zip(weights, targets, strict=True)) / sum(weights)
    assert mean == pytest.approx(0.5, abs=1e-9)
