"""DSnoT against a transcription of the reference (zyxxmu/DSnoT, lib/prune.py `prune_DSnoT` and
lib/layerwrapper.py `WrappedGPT.add_batch`), written here on tensors, and its invariants."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from cps.pruning.base import REFINEMENTS, InputStats, MethodOptions
from cps.pruning.dsnot import DSnoT, DSnoTSettings, dsnot_refine, expected_error
from cps.pruning.masks import SparsityTarget, matrix_mask, nm_mask, row_mask
from cps.pruning.wanda import wanda_scores

# ---------------------------------------------------------------------------------------------
# The reference, transcribed (names and statement order kept; `args` become parameters)


def _reference_statistics(windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """WrappedGPT.add_batch called once per window (the reference's forward per sample)."""
    columns = windows.shape[-1]
    scaler_row, sum_metric_row = torch.zeros(columns), torch.zeros(columns)
    var, mean = torch.zeros(columns), torch.zeros(columns)
    nsamples, ntokens = 0, 0
    for window in windows:
        inp = window.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t().type(torch.float32)
        mean_inp = torch.mean(inp, dim=1, keepdim=True)
        var_inp = torch.var(inp, dim=1, unbiased=False, keepdim=True)
        num_inp = inp.shape[1]
        var = var_inp if ntokens == 0 else (var * ntokens + var_inp * num_inp) / (ntokens + num_inp)
        mean = mean_inp if ntokens == 0 else (mean * ntokens + mean_inp * num_inp) / (ntokens + num_inp)
        ntokens += num_inp
        scaler_row *= nsamples / (nsamples + tmp)
        sum_metric_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
        sum_metric_row += torch.sum(inp, dim=1) / nsamples
    return scaler_row, sum_metric_row, var


def _return_reorder_indice(input_tensor: Tensor) -> Tensor:
    positive_mask = input_tensor > 0
    negative_mask = input_tensor < 0
    positive_indices = (
        torch.arange(0, input_tensor.shape[1]).to(torch.float64).repeat(input_tensor.shape[0], 1)
    )
    negative_indices = (
        torch.arange(0, input_tensor.shape[1]).to(torch.float64).repeat(input_tensor.shape[0], 1)
    )
    positive_indices[~positive_mask] = float("inf")
    negative_indices[~negative_mask] = float("inf")
    positive_value, _ = torch.sort(positive_indices, dim=1)
    negative_value, _ = torch.sort(negative_indices, dim=1)
    positive_value = torch.flip(positive_value, dims=[1])
    negative_value[negative_value == float("inf")] = 0
    positive_value[positive_value == float("inf")] = 0
    return (positive_value + negative_value).to(torch.int64)


def _pointers(rows: int, last_one: int) -> tuple[Tensor, Tensor]:
    indice_indice_list = torch.zeros((rows, 2), dtype=torch.long)
    indice_indice_list[:, 1] = last_one
    update_num = torch.ones((rows, 2), dtype=torch.long)
    update_num[:, 1] = -1
    return indice_indice_list, update_num


def _advance(indice_indice_list: Tensor, update_num: Tensor, error_side: Tensor, block: Tensor) -> Tensor:
    """One pointer read and move (the reference's gather / gather / scatter_ triple)."""
    indice_indice = torch.gather(indice_indice_list, 1, error_side)
    indice = torch.gather(block, 1, indice_indice.to(torch.int64))
    indice_indice_list.scatter_(1, error_side, indice_indice + update_num.gather(1, error_side))
    return indice


def _reference_unstructured(
    W: Tensor,
    scaler_row: Tensor,
    sum_metric_row: Tensor,
    var: Tensor,
    sparsity_ratio: float,
    max_cycle_time: int,
    threshold: float,
    power: float,
) -> tuple[Tensor, Tensor]:
    """The `else:` branch (unstructured) with initial_method wanda and without_same_sign True."""
    DSnoT_metric = W * sum_metric_row.reshape((1, -1))
    initial_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    weight_mask = torch.zeros_like(initial_metric) == 1
    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity_ratio)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(
        sorted_initial_indice, split_size_or_sections=[sparsity_num, res_sparsity_num], dim=1
    )
    weight_mask.scatter_(1, initial_prune_indices, True)
    initial_mask = weight_mask.clone()

    metric_for_regrowing = DSnoT_metric.clone()
    wanda_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    if power:
        metric_for_regrowing /= torch.pow(var.reshape((1, -1)), power)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(
        torch.sort(wanda_metric, dim=1, stable=True)[1],
        split_size_or_sections=[res_sparsity_num, sparsity_num],
        dim=1,
    )
    reorder_indice_of_pruning_indice = _return_reorder_indice(
        torch.gather(DSnoT_metric, 1, wanda_res_indices)
    )
    pruning_indices_block = torch.gather(wanda_res_indices, 1, reorder_indice_of_pruning_indice)

    rows = reconstruction_error.shape[0]
    regrowing_list, update_num_for_regrowing = _pointers(rows, regrowing_indices_block.shape[-1] - 1)
    pruning_list, update_num_for_pruning = _pointers(rows, pruning_indices_block.shape[-1] - 1)
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(update_mask == False) or cycle_time >= max_cycle_time):  # noqa: E712
        cycle_time += 1
        regrowing_side = (reconstruction_error > 0).int().to(torch.int64)
        regrowing_indice = _advance(
            regrowing_list, update_num_for_regrowing, regrowing_side, regrowing_indices_block
        )
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice.to(torch.int64))
        pruning_side = (reconstruction_error < 0).int().to(torch.int64)
        pruning_indice = _advance(pruning_list, update_num_for_pruning, pruning_side, pruning_indices_block)
        pruning_metric = DSnoT_metric.gather(1, pruning_indice.to(torch.int64))
        update_mask = update_mask & (abs(reconstruction_error) > threshold)
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return initial_mask, weight_mask


def _reference_nm(
    W: Tensor,
    scaler_row: Tensor,
    sum_metric_row: Tensor,
    var: Tensor,
    prune_n: int,
    prune_m: int,
    max_cycle_time: int,
    threshold: float,
    power: float,
) -> tuple[Tensor, Tensor]:
    """The `if prune_n != 0:` branch (N:M, prune_n pruned of every prune_m) with initial_method wanda."""
    DSnoT_metric = W * sum_metric_row.reshape((1, -1))
    initial_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    weight_mask = torch.zeros_like(initial_metric) == 1
    initial_prune_indices = torch.zeros((initial_metric.shape[0], 0), dtype=torch.int64)
    initial_res_indices = torch.zeros((initial_metric.shape[0], 0), dtype=torch.int64)
    for ii in range(initial_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = initial_metric[:, ii : (ii + prune_m)].float()
            _, tmp_all_indices = torch.sort(tmp, dim=1)
            tmp_all_indices += ii
            tmp_indices, tmp_res_indices = torch.split(tmp_all_indices, [prune_n, prune_m - prune_n], dim=1)
            initial_prune_indices = torch.cat((initial_prune_indices, tmp_indices), dim=1)
            initial_res_indices = torch.cat((initial_res_indices, tmp_res_indices), dim=1)
            weight_mask.scatter_(1, tmp_indices, True)
    initial_mask = weight_mask.clone()

    metric_for_regrowing = DSnoT_metric.clone()
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    initialize_error_sign = torch.sign(reconstruction_error)
    if power:
        metric_for_regrowing /= torch.pow(var.reshape((1, -1)), power)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    rows = reconstruction_error.shape[0]
    regrowing_list, update_num_for_regrowing = _pointers(rows, regrowing_indices_block.shape[-1] - 1)
    initial_metric.scatter_(1, initial_prune_indices, float("inf"))
    W_metric_max_value = torch.max(initial_metric, dim=1, keepdim=True)[0] + 1
    cycle_time = 1
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    while not (torch.all(update_mask == False) or cycle_time > max_cycle_time):  # noqa: E712
        cycle_time += 1
        regrowing_side = (reconstruction_error > 0).int().to(torch.int64)
        indice_indice_for_regrowing = torch.gather(regrowing_list, 1, regrowing_side)
        regrowing_indice = torch.gather(
            regrowing_indices_block, 1, indice_indice_for_regrowing.to(torch.int64)
        )
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice.to(torch.int64))
        recover_block_start_indice = regrowing_indice - regrowing_indice % prune_m
        recover_block_indices = (
            torch.arange(0, prune_m).repeat(recover_block_start_indice.shape[1], 1)
            + recover_block_start_indice
        )
        pruning_block = torch.gather(initial_metric, 1, recover_block_indices.to(torch.int64))
        _, pruning_indice = torch.topk(pruning_block, 1, dim=1, largest=False)
        pruning_indice += recover_block_start_indice
        pruning_metric = DSnoT_metric.gather(1, pruning_indice.to(torch.int64))
        reconstruction_error_after = reconstruction_error + pruning_metric - regrowing_metric
        update_mask = (
            update_mask
            & (initialize_error_sign == torch.sign(reconstruction_error_after))
            & (abs(reconstruction_error) > threshold)
        )
        initial_metric.scatter_(1, pruning_indice, W_metric_max_value)
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
        regrowing_list.scatter_(
            1,
            regrowing_side,
            indice_indice_for_regrowing + update_num_for_regrowing.gather(1, regrowing_side),
        )
    return initial_mask, weight_mask


# ---------------------------------------------------------------------------------------------
# A toy layer


def _windows(count: int, length: int, columns: int, seed: int) -> Tensor:
    """X (windows, tokens, in) with uneven scales and non-zero column means, so rows have errors."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(columns, generator=generator) * 2 + 0.2
    means = torch.randn(columns, generator=generator)
    return torch.randn(count, length, columns, generator=generator) * scales + means


def _weight(rows: int, columns: int, seed: int) -> Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed + 1)) * 0.05


def _stats(windows: Tensor) -> InputStats:
    """What the engine gathers (cps.pruning.engine `_add_moments`), from X (windows, tokens, in)."""
    X = windows.reshape(-1, windows.shape[-1])
    window_var = torch.var(windows, dim=1, unbiased=False).mean(dim=0)
    return InputStats(None, X.shape[0], (X**2).sum(0), X.sum(0), window_var, windows.shape[0])


def _refine(
    module: str, W: Tensor, mask: Tensor, stats: InputStats, target: SparsityTarget, **options: Any
) -> Tensor:
    return DSnoT(MethodOptions(**options)).refine(module, W, mask, stats, target)


def _dsnot(cycles: int, threshold: float) -> dict[str, Any]:
    return {"dsnot_cycles": cycles, "dsnot_threshold": threshold}


def _row_counts(mask: Tensor) -> Tensor:
    return mask.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Equal to the reference


@pytest.mark.parametrize(
    ("sparsity", "threshold", "cycles"), [(0.5, 0.1, 50), (0.7, 0.5, 50), (0.5, 0.02, 8)]
)
def test_unstructured_equals_the_reference(sparsity: float, threshold: float, cycles: int) -> None:
    windows = _windows(4, 32, 256, seed=0)
    W = _weight(32, 256, seed=0)
    scaler_row, sum_metric_row, var = _reference_statistics(windows)
    stats = _stats(windows)
    # the mapping onto InputStats (the reference accumulates per window)
    torch.testing.assert_close(stats.squares / stats.windows, scaler_row)
    torch.testing.assert_close(stats.sums / stats.windows, sum_metric_row)
    torch.testing.assert_close(stats.window_var, var.reshape(-1))
    initial, expected = _reference_unstructured(
        W, scaler_row, sum_metric_row, var, sparsity, cycles, threshold, 1.0
    )
    # the regime the reference is made for: its pointers stayed within each row's candidates
    assert torch.equal(_row_counts(expected), _row_counts(initial))
    assert torch.equal(initial, row_mask(wanda_scores(W, stats.column_norms()), sparsity))
    refined = _refine(
        "self_attn.q_proj", W, initial, stats, SparsityTarget(sparsity), **_dsnot(cycles, threshold)
    )
    assert not torch.equal(refined, initial)  # it swapped
    assert torch.equal(refined, expected)


def test_nm_equals_the_reference() -> None:
    windows = _windows(4, 32, 256, seed=1)
    W = _weight(32, 256, seed=1)
    scaler_row, sum_metric_row, var = _reference_statistics(windows)
    stats = _stats(windows)
    initial, expected = _reference_nm(W, scaler_row, sum_metric_row, var, 2, 4, 50, 0.1, 1.0)
    assert torch.equal(initial, nm_mask(wanda_scores(W, stats.column_norms()), 2, 4))
    refined = _refine(
        "self_attn.o_proj", W, initial, stats, SparsityTarget.parse("2:4", None), **_dsnot(50, 0.1)
    )
    assert not torch.equal(refined, initial)
    assert torch.equal(refined, expected)
    assert torch.equal(refined.reshape(32, -1, 4).sum(-1), initial.reshape(32, -1, 4).sum(-1))  # still 2:4


def test_nm_blocks_keep_their_counts_when_more_are_pruned_than_kept() -> None:
    """1:4: after one swap a block's only kept weight is the regrown one, which is never pruned
    again; a second regrowing in that block then stops the row (the reference would prune an
    already pruned weight there and lose one from the block's count)."""
    windows = _windows(4, 32, 128, seed=5)
    W = _weight(32, 128, seed=5)
    stats = _stats(windows)
    mask = nm_mask(wanda_scores(W, stats.column_norms()), 1, 4)
    refined = _refine(
        "self_attn.k_proj", W, mask, stats, SparsityTarget.parse("1:4", None), **_dsnot(200, 0.0)
    )
    assert (refined != mask).any(dim=1).sum() >= 10
    assert (refined.reshape(32, -1, 4).sum(-1) == 3).all()


# ---------------------------------------------------------------------------------------------
# Invariants on masks the reference never sees


def test_unequal_row_counts_keep_sparsity_and_reach_the_threshold() -> None:
    """Each swap regrows one weight and prunes one, so every row keeps its count. A row stops
    swapping as soon as |e_i| <= threshold, so a row that changed and stopped within the cycle limit
    (with candidates left) ends with |e_i| <= threshold < |its initial e_i|; rows already within the
    threshold, rows with nothing pruned and rows with nothing kept stay as they were."""
    windows = _windows(4, 32, 128, seed=2)
    windows[:, :, 0] = 0.0  # an input that is always 0: W mu = 0 and Var = 0 (0 / 0 in the ratio)
    W = _weight(24, 128, seed=2)
    stats = _stats(windows)
    mask = matrix_mask(W.abs(), 0.6)
    mask[0], mask[1] = False, True  # a row with nothing pruned, a row with nothing kept
    assert len(set(_row_counts(mask).tolist())) > 5
    mean, threshold = stats.sums / stats.windows, 0.3
    refined = _refine("self_attn.v_proj", W, mask, stats, SparsityTarget(0.6), **_dsnot(200, threshold))
    assert torch.equal(_row_counts(refined), _row_counts(mask))
    before, after = expected_error(W, mask, mean).abs(), expected_error(W, refined, mean).abs()
    changed = (refined != mask).any(dim=1)
    assert changed.sum() >= 15
    assert not changed[:2].any()
    assert (after[changed] <= threshold).all() and (before[changed] > threshold).all()
    assert torch.equal(refined[before <= threshold], mask[before <= threshold])
    # W mu = 0 puts the always-0 input in the middle of the regrowing order, reached last (not NaN)
    assert not (mask[:, 0] & ~refined[:, 0]).any()


def test_pointers_stop_within_each_rows_candidates() -> None:
    """One pruned weight per row and many cycles: a row swaps at most once, then its regrowing
    candidates are used up (the reference would regrow kept weights and lose the row's count)."""
    generator = torch.Generator().manual_seed(3)
    W, mean = torch.randn(6, 16, generator=generator), torch.rand(16, generator=generator) + 0.5
    mask = torch.zeros(6, 16, dtype=torch.bool)
    mask[torch.arange(6), torch.arange(6) * 2] = True
    settings = DSnoTSettings(cycles=50, threshold=0.0)
    refined = dsnot_refine(W, mask, mean, torch.ones(16), W.abs(), settings)
    assert torch.equal(_row_counts(refined), _row_counts(mask))
    assert ((refined != mask).sum(dim=1) == 2).all()  # one swap in every row, then it stops


# ---------------------------------------------------------------------------------------------
# Options


def test_skipped_sub_block_keeps_its_mask() -> None:
    windows = _windows(2, 32, 64, seed=4)
    W = _weight(16, 64, seed=4)
    stats = _stats(windows)
    mask = row_mask(wanda_scores(W, stats.column_norms()), 0.5)
    target = SparsityTarget(0.5)
    assert REFINEMENTS["dsnot"] is DSnoT
    assert torch.equal(_refine("mlp.down_proj", W, mask, stats, target), mask)  # the default skips mlp
    assert not torch.equal(_refine("self_attn.q_proj", W, mask, stats, target), mask)
    assert not torch.equal(_refine("mlp.down_proj", W, mask, stats, target, dsnot_skip="none"), mask)
    assert torch.equal(_refine("self_attn.q_proj", W, mask, stats, target, dsnot_skip="self_attn"), mask)
