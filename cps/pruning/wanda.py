"""Wanda (Sun et al., ICLR 2024, arXiv 2306.11695): prune by |W_ij| * ||X_j||_2 within each output row."""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget, target_mask


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2; W (out, in), norms (in,)."""
    return weight.abs() * column_norms.reshape(1, -1)


@register("wanda")
class Wanda(PruningMethod):
    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        scores = wanda_scores(weight, stats.column_norms())
        return Pruned(target_mask(scores, target, per_row=True))
