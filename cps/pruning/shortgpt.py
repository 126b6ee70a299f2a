"""ShortGPT (Men et al., 2024, arXiv 2403.03853): remove whole decoder layers, those with the lowest
Block Influence BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)], the cosine between a layer's input and output
hidden states averaged over the calibration tokens (the engine's dense pass, `engine.remove_layers`).

`sparsity` is the share of decoder layers removed: int(layers * sparsity) of them (a floor, as
every cps target counts). A removed layer's linears are zeroed, which makes the layer the identity
on the residual stream; a saved model has the layers taken out and its config shortened.
"""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget


def lowest_influence(influence: list[float], count: int) -> list[int]:
    """The `count` layers of lowest Block Influence (ties: the earlier layer), ascending indices."""
    order = sorted(range(len(influence)), key=lambda index: (influence[index], index))
    return sorted(order[:count])


@register("shortgpt")
class ShortGPT(PruningMethod):
    removes_layers = True
    supports_nm = False

    def choose_layers(self, influence: list[float], target: SparsityTarget) -> list[int]:
        return lowest_influence(influence, int(len(influence) * target.sparsity))

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        """A linear of a removed layer: every weight goes."""
        return Pruned(torch.ones_like(weight, dtype=torch.bool))
