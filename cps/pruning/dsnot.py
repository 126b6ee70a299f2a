"""DSnoT (Zhang et al., ICLR 2024, arXiv 2310.08915, "Dynamic Sparse No Training"): refine any
method's mask, without training or new weights, by swapping pruned and kept weights in each row.

Pruning row i's set P_i removes sum_{j in P_i} W_ij X_j from output i; its expectation is the row's
expected reconstruction error e_i = sum_{j in P_i} W_ij mu_j (mu_j: the mean of input j, in the
reference's units, the sum of X_j over a window averaged over windows). Every row starts updating;
then, for at most `cycles` cycles, vectorised over rows (reference: zyxxmu/DSnoT, `prune_DSnoT`):

1. a row stops for good once |e_i| <= threshold, or when its candidates of step 2 or 3 run out;
2. regrow one pruned weight: where e_i > 0 the one with the largest W_ij mu_j / Var(X_j)^power not
   yet regrown, else the smallest (two pointers into the row's pruned weights sorted by that ratio);
3. prune one kept weight, unstructured: the next one from the back where e_i < 0, else from the
   front, of the row's kept weights ordered [W mu < 0 by rising Wanda score, W mu = 0, W mu > 0 by
   falling Wanda score], so first the lowest-Wanda one whose W mu moves e_i towards 0;
   N:M: the lowest-Wanda kept weight (not a regrown one) in the regrown weight's M-block;
4. N:M only (the reference's N:M branch always checks, its unstructured one by default not): the row
   stops if the swap would change the sign of e_i;
5. swap: e_i += W_i,pruned mu_pruned - W_i,regrown mu_regrown.

Each swap regrows one weight and prunes one (in the same M-block for N:M), so every row keeps its
count. Masks may prune different counts per row (magnitude's per-matrix mask): each row's pointers
stay within its own candidates. Equal to the reference whenever it keeps every row's count and no
W_ij mu_j is exactly 0: its pointers run past a row's candidates into kept weights (changing the
row's count, or, N:M with more pruned than kept per block, a block's), its ordering of kept weights
sends those with W mu = 0 to the first position, and an input that never varies (0 / 0) ranks as
NaN in its regrowing order, here as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cps.pruning.base import InputStats, MaskRefinement, register_refinement
from cps.pruning.masks import SparsityTarget
from cps.pruning.wanda import wanda_scores


@dataclass(frozen=True)
class DSnoTSettings:
    """The loop's knobs (`MethodOptions.dsnot_*`) and the target's M-block for N:M."""

    cycles: int = 50  # swaps per row at most
    threshold: float = 0.1  # a row stops once |e_i| is at most this
    var_power: float = 1.0  # regrowing ranks by W_ij mu_j / Var(X_j)^var_power
    group: int | None = None  # M of an N:M target: each swap stays inside one M-block


def expected_error(W: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = sum_{j pruned} W_ij mu_j (out,); W, mask (out, in), mean mu (in,)."""
    return (W * mean.reshape(1, -1)).masked_fill(~mask, 0).sum(dim=1)


def _members_by_key(key: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's member columns by rising `key` (ties by column), then the others: (out, in), and
    the members per row (out,)."""
    by_key = torch.sort(key, dim=1, stable=True).indices
    outsiders = (~members.gather(1, by_key)).to(torch.uint8)
    members_first = torch.sort(outsiders, dim=1, stable=True).indices
    return by_key.gather(1, members_first), members.sum(dim=1)


def _regrowing_order(
    D: torch.Tensor, var: torch.Tensor, var_power: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned columns of each row by rising D_ij / Var_j^power: (out, in) padded, counts (out,)."""
    ratio = D / torch.pow(var.reshape(1, -1), var_power) if var_power else D
    ratio = torch.where(ratio.isnan(), 0.0, ratio)  # 0 / 0: an input that never varies
    return _members_by_key(ratio, mask)


def _pruning_order(
    D: torch.Tensor, wanda: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept columns of each row ordered [D < 0 by rising Wanda, D = 0, D > 0 by falling Wanda]:
    (out, in) padded, counts (out,)."""
    kept_by_wanda, kept = _members_by_key(wanda, ~mask)
    columns = D.shape[1]
    rank = torch.arange(columns, device=D.device).expand_as(D)  # position in the Wanda order
    D_kept = D.gather(1, kept_by_wanda)
    key = torch.where(D_kept < 0, rank, torch.where(D_kept > 0, 3 * columns - rank, columns + rank))
    key = key.masked_fill(rank >= kept.unsqueeze(1), 4 * columns)  # padding last
    return kept_by_wanda.gather(1, torch.sort(key, dim=1, stable=True).indices), kept


class _TwoPointers:
    """Two pointers into each row's candidates (out, in) padded: `low` from the front, `high` from the
    back; a row's candidates run out when they cross."""

    def __init__(self, order: torch.Tensor, counts: torch.Tensor) -> None:
        self.order = order
        self.low = torch.zeros_like(counts)
        self.high = counts - 1

    def take(self, from_back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next column (out,), from the back where `from_back`, and whether one was left."""
        left = self.low <= self.high
        position = torch.where(from_back, self.high, self.low).clamp(0, self.order.shape[1] - 1)
        self.high = self.high - from_back.long()
        self.low = self.low + (~from_back).long()
        return self.order.gather(1, position.unsqueeze(1)).squeeze(1), left


def _lowest_in_block(
    prunable: torch.Tensor, regrown: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column of the lowest `prunable` score in each row's M-block of `regrown` (out,), and
    whether it is finite (a kept weight is left there)."""
    start = regrown - regrown % group  # (out,)
    block = start.unsqueeze(1) + torch.arange(group, device=regrown.device)  # (out, M)
    lowest, offset = prunable.gather(1, block).min(dim=1)
    return start + offset, lowest.isfinite()


def dsnot_refine(
    W: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    wanda: torch.Tensor,
    settings: DSnoTSettings,
) -> torch.Tensor:
    """The refined mask (out, in), True = pruned; W, wanda (out, in), mean mu and var (in,)."""
    D = W * mean.reshape(1, -1)  # expected contribution of each weight to its output (out, in)
    mask = mask.clone()
    e = expected_error(W, mask, mean)  # (out,)
    initial_sign = torch.sign(e)
    regrowing = _TwoPointers(*_regrowing_order(D, var, settings.var_power, mask))
    pruning = _TwoPointers(*_pruning_order(D, wanda, mask))
    prunable = wanda.masked_fill(mask, float("inf"))  # N:M: kept weights that may be pruned
    updating = torch.ones_like(e, dtype=torch.bool)
    for _ in range(settings.cycles):
        if not updating.any():
            break
        regrown, regrow_left = regrowing.take(e > 0)
        if settings.group is None:
            pruned, prune_left = pruning.take(e < 0)
        else:
            pruned, prune_left = _lowest_in_block(prunable, regrown, settings.group)
        D_regrown = D.gather(1, regrown.unsqueeze(1)).squeeze(1)
        D_pruned = D.gather(1, pruned.unsqueeze(1)).squeeze(1)
        updating &= (e.abs() > settings.threshold) & regrow_left & prune_left
        if settings.group is not None:
            updating &= torch.sign(e + D_pruned - D_regrown) == initial_sign
        rows = updating.nonzero().squeeze(1)
        mask[rows, pruned[rows]] = True
        mask[rows, regrown[rows]] = False
        prunable[rows, pruned[rows]] = float("inf")
        e = e + torch.where(updating, D_pruned, 0.0) - torch.where(updating, D_regrown, 0.0)
    return mask


@register_refinement("dsnot")
class DSnoT(MaskRefinement):
    """Swaps within each row of the mask method's mask; the linears of the sub-block named by
    `dsnot_skip` (e.g. mlp.*, the reference's default) keep their mask."""

    logged_options = ("dsnot_cycles", "dsnot_threshold", "dsnot_var_power", "dsnot_skip")

    def refine(
        self, module: str, weight: torch.Tensor, mask: torch.Tensor, stats: InputStats, target: SparsityTarget
    ) -> torch.Tensor:
        if module.split(".")[0] == self.options.dsnot_skip:
            return mask
        if stats.sums is None or stats.window_var is None:
            raise ValueError("DSnoT needs the column sums and window variances of X (needs_moments)")
        windows = max(stats.windows, 1)  # the reference's statistics are per calibration window
        squares = stats.squares if stats.squares is not None else torch.diagonal(stats.require_gram())
        wanda = wanda_scores(weight, torch.sqrt(squares / windows))
        settings = DSnoTSettings(
            self.options.dsnot_cycles,
            self.options.dsnot_threshold,
            self.options.dsnot_var_power,
            target.group,
        )
        return dsnot_refine(weight, mask, stats.sums / windows, stats.window_var, wanda, settings)
