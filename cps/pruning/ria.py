"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models").

S_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2^a, a = 0.5: a weight's share of
its input channel's and of its output row's absolute weight, times the input's norm to a power.
Unstructured pruning compares the scores over the whole matrix (the reference's default, without
--per_outneuron; it prunes the entries at or below the int(numel * sparsity)-th smallest score,
one more than the target when there are no ties: cps prunes exactly the target count); N:M within
every M consecutive inputs of a row. The reference's optional channel permutation for N:M
(--reallocation, --lsa) is not built.
"""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget, target_mask


def ria_scores(weight: torch.Tensor, column_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """S (out, in) from W (out, in) and ||X_j|| (in,). A zero row or column gives a zero share."""
    magnitude = weight.abs()
    per_input = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    per_output = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    return (per_input + per_output) * column_norms.reshape(1, -1).pow(a)


@register("ria")
class RIA(PruningMethod):
    logged_options = ("ria_a",)

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        scores = ria_scores(weight, stats.column_norms(), self.options.ria_a)
        return Pruned(target_mask(scores, target, per_row=False))
