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
    """S (out, in) from W (out, in) and ||X_j|| (in,), as |W_ij| * (n_j / c_j + n_j / r_i) with
    n = ||X||^a, c and r the column and row sums of |W| (two (out, in) temporaries, not six: RIA
    stays within 1.1x of Wanda's time). A zero row or column gives a zero share."""
    tiny = torch.finfo(weight.dtype).tiny
    magnitude = weight.abs()  # (out, in)
    activation = column_norms.reshape(1, -1).pow(a)  # (1, in)
    per_input = activation / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, in)
    per_output = 1 / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)  # (out, 1)
    return magnitude.mul_(torch.addcmul(per_input, per_output, activation))


@register("ria")
class RIA(PruningMethod):
    logged_options = ("ria_a",)

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        scores = ria_scores(weight, stats.column_norms(), self.options.ria_a)
        return Pruned(target_mask(scores, target, per_row=False))
