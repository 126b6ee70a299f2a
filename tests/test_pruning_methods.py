"""Masks and methods against brute-force references written independently here."""

from __future__ import annotations

import logging

import pytest
import torch

from cps.errors import CpsError
from cps.pruning.base import InputStats, MethodOptions, get_method
from cps.pruning.masks import (
    SparsityTarget,
    matrix_mask,
    nm_mask,
    pack_mask,
    row_mask,
    unpack_mask,
)
from cps.pruning.sparsegpt import inverse_hessian_factor, sparsegpt_prune


def _stats(X: torch.Tensor) -> InputStats:
    return InputStats(X.T @ X, X.shape[0])


def _correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + 0.4 * torch.randn(columns, columns, generator=generator)
    scales = torch.rand(columns, generator=generator) * 3 + 0.1  # uneven input norms
    return (torch.randn(tokens, columns, generator=generator) @ mixing) * scales


def _output_error(W: torch.Tensor, W_pruned: torch.Tensor, X: torch.Tensor) -> float:
    return torch.sum(((W - W_pruned) @ X.T) ** 2).item()


# ---------------------------------------------------------------------------------------------
# Targets and masks


def test_sparsity_targets():
    assert SparsityTarget.parse("unstructured", 0.5) == SparsityTarget(0.5)
    two_four = SparsityTarget.parse("2:4", None)
    assert (two_four.keep, two_four.group, two_four.sparsity, two_four.pattern) == (2, 4, 0.5, "2:4")
    assert SparsityTarget.parse("1:4", None).sparsity == 0.75
    assert SparsityTarget.parse("4:8", 0.5).pruned_per_group == 4
    for pattern, sparsity, message in [
        ("unstructured", 1.0, r"\[0, 1\)"),
        ("unstructured", -0.1, r"\[0, 1\)"),
        ("unstructured", None, "needs --sparsity"),
        ("4:4", None, "0 < N < M"),
        ("5:4", None, "0 < N < M"),
        ("0:4", None, "0 < N < M"),
        ("2-4", None, "bad pattern"),
        ("2:4", 0.6, "contradicts"),
    ]:
        with pytest.raises(CpsError, match=message):
            SparsityTarget.parse(pattern, sparsity)


def test_row_and_matrix_masks_match_brute_force():
    scores = torch.rand(7, 20, generator=torch.Generator().manual_seed(1))
    mask = row_mask(scores, 0.45)
    for row in range(7):  # int(20 * 0.45) = 9 lowest of each row
        lowest = sorted(range(20), key=lambda j: scores[row, j].item())[:9]
        assert sorted(torch.nonzero(mask[row]).flatten().tolist()) == sorted(lowest)
    whole = matrix_mask(scores, 0.3)
    flat = sorted(range(140), key=lambda i: scores.flatten()[i].item())[: int(140 * 0.3)]
    assert sorted(torch.nonzero(whole.flatten()).flatten().tolist()) == sorted(flat)


def test_ties_break_by_position_deterministically():
    scores = torch.ones(2, 8)
    assert row_mask(scores, 0.5)[0].tolist() == [True] * 4 + [False] * 4


def test_nm_mask_structure_and_errors():
    scores = torch.rand(5, 16)
    mask = nm_mask(scores, keep=2, group=4)
    groups = mask.reshape(5, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept = (~groups) * scores.reshape(5, 4, 4)
    # the kept two are the two largest of each group
    assert torch.equal(kept.sum(-1), scores.reshape(5, 4, 4).topk(2, dim=-1).values.sum(-1))
    with pytest.raises(CpsError, match="divisible"):
        nm_mask(torch.rand(2, 10), 2, 4)


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (4, 7, 3)])
def test_mask_packing_round_trips(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


# ---------------------------------------------------------------------------------------------
# Wanda and magnitude


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_wanda_equals_brute_force_per_row_topk(pattern):
    X = _correlated_inputs(300, 32)
    W = torch.randn(12, 32)
    target = SparsityTarget.parse(pattern, 0.5 if pattern == "unstructured" else None)
    mask = get_method("wanda").prune(W, _stats(X), target).mask
    norms = [sum(X[t, j].item() ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(32)]
    group = target.group or 32
    drop = (target.group - target.keep) if target.is_nm else 16
    for row in range(12):
        for start in range(0, 32, group):
            columns = range(start, start + group)
            by_score = sorted(columns, key=lambda j: abs(W[row, j].item()) * norms[j])
            expected = set(by_score[:drop])
            assert {j for j in columns if mask[row, j]} == expected


def test_magnitude_prunes_smallest_weights_of_the_matrix():
    W = torch.randn(10, 16)
    mask = get_method("magnitude").prune(W, _stats(torch.randn(4, 16)), SparsityTarget(0.25)).mask
    assert mask.sum() == 40
    assert W[mask].abs().max() <= W[~mask].abs().min()


# ---------------------------------------------------------------------------------------------
# SparseGPT


def obs_reference(
    W: torch.Tensor, X: torch.Tensor, sparsity: float, dampening: float, select_every: int
) -> torch.Tensor:
    """Unblocked OBS: one column at a time, every update applied at once, explicit inverse (float64).

    For each column j in order, the error of its pruned weights is spread over all columns not yet
    processed with the OBS update, and j is eliminated from the inverse Hessian (Gaussian
    elimination). The mask is chosen every `select_every` columns, by SparseGPT's criterion
    w^2 / [H_F^-1]_jj with each column's diagonal as it will be when the column is reached.
    """
    W = W.double().clone()
    H = 2 * X.double().T @ X.double() / X.shape[0]
    H += dampening * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    rows, columns = W.shape
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    total = rows * columns * sparsity

    def eliminate(inverse: torch.Tensor, j: int) -> torch.Tensor:
        return inverse - inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]

    for j in range(columns):
        if j % select_every == 0:
            end = min(j + select_every, columns)
            ahead, diagonal = Hinv.clone(), []
            for k in range(j, end):
                diagonal.append(ahead[k, k].item())
                ahead = eliminate(ahead, k)
            scores = W[:, j:end] ** 2 / torch.tensor(diagonal, dtype=W.dtype)  # OBS saliency
            count = int(total * end / columns) - int(total * j / columns)
            chosen = torch.argsort(scores.flatten(), stable=True)[:count]
            block = torch.zeros(scores.numel(), dtype=torch.bool)
            block[chosen] = True
            mask[:, j:end] = block.reshape(scores.shape)
        pruned = mask[:, j]
        error = W[:, j] * pruned / Hinv[j, j]  # (rows,)
        W[:, j + 1 :] -= error.reshape(-1, 1) * Hinv[j, j + 1 :].reshape(1, -1)  # OBS update
        W[pruned, j] = 0
        Hinv = eliminate(Hinv, j)
    return W.float()


def test_sparsegpt_beats_magnitude_and_wanda_and_matches_obs():
    X = _correlated_inputs(2048, 256, seed=3)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    stats, target = _stats(X), SparsityTarget(0.5)
    pruned = get_method("sparsegpt", MethodOptions(blocksize=128)).prune(W, stats, target)
    assert pruned.weight is not None and torch.equal(pruned.weight == 0, pruned.mask)
    sparsegpt_error = _output_error(W, pruned.weight, X)
    for baseline in ("magnitude", "wanda"):
        mask = get_method(baseline).prune(W, stats, target).mask
        assert sparsegpt_error < _output_error(W, W.masked_fill(mask, 0), X)
    reference = obs_reference(W, X, 0.5, dampening=0.01, select_every=128)
    assert (reference == 0).sum() == pruned.mask.sum() == 64 * 128
    reference_error = _output_error(W, reference, X)
    assert abs(sparsegpt_error - reference_error) / reference_error < 0.01


def test_sparsegpt_single_block_equals_obs_reference_masks():
    X = _correlated_inputs(1024, 64, seed=5)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    new_weight, mask = sparsegpt_prune(W, 2 * X.T @ X / 1024, SparsityTarget(0.5), blocksize=64)
    reference = obs_reference(W, X, 0.5, dampening=0.01, select_every=64)
    assert torch.equal(mask, reference == 0)
    assert torch.allclose(new_weight, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_structure_holds_in_every_group(method, pattern):
    X = _correlated_inputs(512, 64)
    W = torch.randn(24, 64)
    target = SparsityTarget.parse(pattern, None)
    pruned = get_method(method, MethodOptions(blocksize=20)).prune(W, _stats(X), target)
    groups = pruned.mask.reshape(24, 64 // target.group, target.group)
    assert (groups.sum(-1) == target.group - target.keep).all()
    if pruned.weight is not None:
        assert (pruned.weight[pruned.mask] == 0).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_unstructured_sparsity_is_exact(sparsity):
    X = _correlated_inputs(256, 96)
    W = torch.randn(20, 96)
    target = SparsityTarget(sparsity)
    for method in ("magnitude", "wanda", "sparsegpt"):
        mask = get_method(method, MethodOptions(blocksize=32)).prune(W, _stats(X), target).mask
        if method == "wanda":  # Wanda compares within rows: every row exact
            assert (mask.sum(1) == int(96 * sparsity)).all()
        else:
            assert mask.sum().item() == int(20 * 96 * sparsity)


def test_singular_hessian_gives_finite_weights():
    X = _correlated_inputs(512, 32)
    X[:, 5] = X[:, 3]  # duplicated input column
    X[:, 7] = 0  # dead input column
    W = torch.randn(8, 32)
    pruned = get_method("sparsegpt").prune(W, _stats(X), SparsityTarget(0.5))
    assert torch.isfinite(pruned.weight).all()
    assert (pruned.weight[:, 7] == 0).all()  # a dead input's weights are dropped


def test_cholesky_failure_raises_dampening_instead_of_crashing(caplog):
    v = torch.randn(64, 1)
    rank_one = v @ v.T  # singular: Cholesky fails at a negligible dampening
    with caplog.at_level(logging.WARNING):
        factor = inverse_hessian_factor(rank_one, dampening=1e-12)
    assert "retrying" in caplog.text
    assert torch.isfinite(factor).all()
    assert torch.equal(factor, torch.triu(factor))


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse():
    """U upper with a positive diagonal and U^T U = (H + damp I)^-1: the float64 factor, to fp32."""
    X = _correlated_inputs(2048, 96, seed=7)
    H = 2 * X.T @ X / 2048
    U = inverse_hessian_factor(H, dampening=0.01)
    damped = H.double() + 0.01 * torch.diagonal(H).double().mean() * torch.eye(96, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.equal(U, torch.triu(U)) and (torch.diagonal(U) > 0).all()
    assert torch.allclose(U.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_group_of_linears_equals_each_alone(pattern):
    """q, k and v (or gate and up) in one pass over their stacked rows: bitwise the masks and
    weights of pruning each alone with the same inputs (each mask chosen among its own rows)."""
    X = _correlated_inputs(1024, 128, seed=8)
    weights = [torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)) for rows in (48, 16, 16)]
    method, target = get_method("sparsegpt", MethodOptions(blocksize=64)), SparsityTarget.parse(pattern, 0.5)
    together = method.prune_group(weights, _stats(X), target)
    for W, joint in zip(weights, together, strict=True):
        alone = method.prune(W, _stats(X), target)
        assert torch.equal(joint.mask, alone.mask) and torch.equal(joint.weight, alone.weight)
        assert int(joint.mask.sum()) == W.numel() // 2  # each linear pruned to its own 50%


def test_unknown_method_and_bad_options():
    with pytest.raises(CpsError, match="unknown method 'obc'"):
        get_method("obc")
    with pytest.raises(CpsError, match="blocksize"):
        MethodOptions(blocksize=0)
    with pytest.raises(CpsError, match="dampening"):
        MethodOptions(dampening=0)


def test_a_new_method_is_one_file(tmp_path, monkeypatch, store):
    """A module dropped into cps/pruning registers itself; prune, eval (rebuilt from the masks, as
    its traits say) and the params follow without another edit."""
    import cps.pruning
    from cps import tracking
    from cps.config import CalibrationConfig, EvalConfig, PruneConfig
    from cps.pruning import base
    from cps.stages.evaluate import run_eval
    from cps.stages.prune import run_prune

    (tmp_path / "smallest_rows.py").write_text(
        "from cps.pruning.base import Pruned, PruningMethod, register\n"
        "from cps.pruning.masks import target_mask\n"
        "@register('smallest_rows')\n"
        "class SmallestRows(PruningMethod):\n"
        "    logged_options = ('blocksize',)\n"
        "    def prune(self, weight, stats, target):\n"
        "        return Pruned(target_mask(weight.abs(), target, per_row=True))\n"
    )
    monkeypatch.setattr(cps.pruning, "__path__", [*cps.pruning.__path__, str(tmp_path)])
    base._discover_methods.cache_clear()
    try:
        calibration = CalibrationConfig("tiny-llama", "sw", nsamples=2, seqlen=32)
        config = PruneConfig("tiny-llama", "smallest_rows", calibration, save_model=False, blocksize=64)
        pruned = run_prune(config, store)
        record = tracking.get_run(store, pruned.run_id)
        assert record.params["method"] == "smallest_rows" and record.params["blocksize"] == "64"
        assert "dampening" not in record.params
        assert record.metrics["sparsity.actual"] == pytest.approx(0.5)
        result = run_eval(EvalConfig(langs=("sw",), seqlen=64, max_docs=2), store, pruned.run_id)
        assert result.metrics["snr_db.sw"] > 0  # rebuilt as dense weights x masks, then scored
    finally:
        base.METHODS.pop("smallest_rows", None)
        base._discover_methods.cache_clear()


@pytest.mark.parametrize("size", [7, 128, 301, 700])
def test_triangular_inverse_by_halves_is_the_inverse(size):
    """L^-1 by halves (uneven halves included) equals the float64 inverse to fp32 accuracy and is
    lower triangular."""
    from cps.pruning.sparsegpt import lower_triangular_inverse

    X = _correlated_inputs(4 * size, size, seed=size)
    lower = torch.linalg.cholesky(X.T @ X / (4 * size) + 0.01 * torch.eye(size))
    inverse = lower_triangular_inverse(lower)
    exact = torch.linalg.inv(lower.double())
    assert torch.equal(inverse, torch.tril(inverse))
    assert (inverse.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("rows", [1, 16])
def test_sparsegpt_leaves_the_callers_weight_alone(rows):
    """sparsegpt_prune works on its own copy, also for a one-row weight (whose transpose is already
    contiguous)."""
    X = _correlated_inputs(256, 32, seed=9)
    W = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))
    before = W.clone()
    new_weight, mask = sparsegpt_prune(W, 2 * X.T @ X / 256, SparsityTarget(0.5), blocksize=16)
    assert torch.equal(W, before)
    assert int(mask.sum()) == rows * 16 and (new_weight[mask] == 0).all()
