"""Magnitude pruning: drop the smallest |W| over the whole matrix (or in each N:M group)."""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget, target_mask


@register("magnitude")
class Magnitude(PruningMethod):
    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        return Pruned(target_mask(weight.abs(), target, per_row=False))
