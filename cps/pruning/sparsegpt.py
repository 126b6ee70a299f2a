"""SparseGPT (Frantar & Alistarh, ICML 2023, arXiv 2301.00774): one-shot OBS pruning with weight updates.

The column loop (`cps.pruning.obs`, shared with GPTQ) prunes each column and moves its error onto
the columns not yet processed; the mask is chosen adaptively per block (unstructured) or per M
columns (N:M). With `--bits`, each kept weight is also rounded to the quantization grid in the same
loop, its rounding error moved on like a pruned weight's (the paper's joint sparse + quantized
mode, section 4: 50% + 4-bit); the grid is fitted on the dense weights before the loop.
"""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget

# (the factor's functions are imported where tests and benchmarks find them)
from cps.pruning.obs import (  # noqa: F401
    hessian_factor,
    inverse_hessian_factor,
    lower_triangular_inverse,
    obs_columns,
)
from cps.pruning.quant import ColumnRounder


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: SparsityTarget,
    blocksize: int = 128,
    dampening: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
    splits: list[int] | None = None,
    rounder: ColumnRounder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) given H (in, in) ~ 2 X^T X / n (or its `hessian_factor`, when already
    computed for another linear of the same inputs). Returns (new W with zeros, mask). With
    `rounder`, the kept weights are quantized in the same loop (the paper's joint mode).

    With `splits`, W is several linears of the same inputs stacked by rows (their row counts),
    each linear's unstructured mask chosen among its own rows, as if pruned alone."""
    factor = factor if factor is not None else hessian_factor(hessian, dampening)
    new_weight, mask = obs_columns(weight, factor, blocksize, target, rounder, splits=splits)
    if mask is None:  # sparsity 0: nothing pruned
        mask = torch.zeros_like(new_weight, dtype=torch.bool)
    return new_weight, mask


@register("sparsegpt")
class SparseGPT(PruningMethod):
    updates_weights = True
    needs_gram = True
    logged_options = ("blocksize", "dampening")
    joint_quantization = True

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        return self.prune_group([weight], stats, target)[0]

    def prune_group(
        self, weights: list[torch.Tensor], stats: InputStats, target: SparsityTarget
    ) -> list[Pruned]:
        """The linears of one input group in one pass: one inverse-Hessian factor, one loop over
        the columns for their stacked rows (the same masks and weights as one at a time)."""
        hessian = stats.require_gram() * (2 / max(stats.tokens, 1))  # H = 2 X^T X / n
        factor = hessian_factor(hessian, self.options.dampening)
        splits = [weight.shape[0] for weight in weights]
        options, W = self.options, torch.cat(weights)
        grid = options.grid  # joint: the grid fitted on the dense weights, as the reference's
        params = None if grid is None else grid.fit(W, options.scale_dtype)
        rounder = None if params is None else ColumnRounder(params)
        new_weight, mask = sparsegpt_prune(
            W, hessian, target, options.blocksize, options.dampening, factor, splits, rounder
        )
        parts = [None] * len(weights) if params is None else params.split(splits)
        return [
            Pruned(m, w, q)
            for m, w, q in zip(mask.split(splits), new_weight.split(splits), parts, strict=True)
        ]
