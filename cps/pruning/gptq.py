"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323): one-shot weight quantization with OBS updates.

Each column of W is rounded to the grid (`cps.pruning.quant`) and its rounding error moved onto
the columns not yet rounded through the inverse Hessian of the layer's inputs, H = 2 X^T X / n:
the column loop, Cholesky factor and lazy batch updates are SparseGPT's (`cps.pruning.obs`).
Options as the reference and llm-compressor: `blocksize` columns per lazy update, `dampening` x
mean(diag H) on the diagonal, `act_order` (columns in descending order of diag H, each still on
its own group's grid, so no group index is stored), per-group min-max scales fitted on the weights
before the loop. After pruning (`--bits` on `cps prune`), the pruned zeros are held at 0 and the
kept weights absorb their share of the error.
"""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, QuantizationMethod, register
from cps.pruning.obs import hessian_factor, obs_columns
from cps.pruning.quant import ColumnRounder


@register("gptq")
class GPTQ(QuantizationMethod):
    needs_gram = True
    logged_options = ("bits", "group_size", "sym", "act_order", "blocksize", "dampening")

    def quantize_group(
        self, weights: list[torch.Tensor], stats: InputStats, masks: list[torch.Tensor | None]
    ) -> list[Pruned]:
        """One factor and one column loop for the group's stacked rows (rows are independent)."""
        grid, options = self.require_grid(), self.options
        splits = [weight.shape[0] for weight in weights]
        W = torch.cat(weights)
        params = grid.fit(W, options.scale_dtype)  # per row and group: stacking changes nothing
        none = [torch.zeros_like(w, dtype=torch.bool) for w in weights]
        held = [m if m is not None else empty for m, empty in zip(masks, none, strict=True)]
        keep = torch.cat(held) if any(m is not None for m in masks) else None
        hessian = stats.require_gram() * (2 / max(stats.tokens, 1))
        order = None
        if options.act_order:
            order = torch.argsort(torch.diagonal(hessian), descending=True)
            hessian = hessian[order][:, order]
            W = W[:, order]
            keep = None if keep is None else keep[:, order]
        factor = hessian_factor(hessian, options.dampening)
        rounder = ColumnRounder(params, order)
        new_weight, _ = obs_columns(W, factor, options.blocksize, None, rounder, keep_zeros=keep)
        if order is not None:
            new_weight = new_weight[:, torch.argsort(order)]
        return [
            Pruned(mask, weight, part)
            for mask, weight, part in zip(held, new_weight.split(splits), params.split(splits), strict=True)
        ]
