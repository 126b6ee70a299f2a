"""Round to nearest (RTN): every weight to its nearest point of the grid (`cps.pruning.quant`), no
calibration read: the baseline GPTQ is measured against, as magnitude is for pruning."""

from __future__ import annotations

import torch

from cps.pruning.base import InputStats, Pruned, QuantizationMethod, register


@register("rtn")
class RTN(QuantizationMethod):
    logged_options = ("bits", "group_size", "sym")

    def quantize_group(
        self, weights: list[torch.Tensor], stats: InputStats, masks: list[torch.Tensor | None]
    ) -> list[Pruned]:
        grid, dtype = self.require_grid(), self.options.scale_dtype
        results = []
        for weight, mask in zip(weights, masks, strict=True):
            params = grid.fit(weight, dtype)
            rounded = params.round(weight)  # 0 stays 0: zero is a code
            held = mask if mask is not None else torch.zeros_like(weight, dtype=torch.bool)
            results.append(Pruned(held, rounded.masked_fill_(held, 0), params))
        return results
