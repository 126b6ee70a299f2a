"""OWL, outlier-weighted layer-wise sparsity (Yin et al., ICML 2024, arXiv 2310.05175): an allocation
of the model's sparsity over its decoder layers, for any mask method (`--allocation owl`).

1. D_l, the layer's outlier ratio: the share (in percent) of the Wanda scores |W_ij| * ||X_j||_2
   of all the layer's linears together that exceed `m` times their mean; X from the dense model's
   activations (the engine's dense pass, `engine.outlier_ratios`).
2. D rescaled to [0, 2 * lam]: D'_l = (D_l - min D) / (max D - min D) * 2 * lam.
3. The layer's sparsity S_l = S - (D'_l - mean D'): more outliers, fewer weights pruned; the mean
   over layers is the target S (every decoder layer of these models has the same linears, so
   the model-wide share is S too), unless a layer falls to the floor below (S < lambda).
This is luuyin/OWL `prune_wanda_outlier` (lib/prune_all.py) line for line, with its floor of 0.01
for a layer at or below zero; llm-compressor's `_infer_owl_layer_sparsity` applies the same
formula to a different norm (the mean over calibration samples of each sample's ||X_j||, against
the root of the mean of squares here): tests/test_owl.py transcribes both and states the gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cps.errors import CpsError

FLOOR = 0.01  # the reference's sparsity for a layer whose allocation falls to zero or below


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """D_l in percent from the score matrices of one layer's linears, taken together (no
    concatenated copy: the mean first, then the count above m times it)."""
    count = sum(score.numel() for score in scores)
    mean = sum(score.double().sum() for score in scores) / count
    threshold = (mean * m).to(scores[0].dtype)  # the comparison the references make, in fp32
    above = sum(int((score > threshold).sum()) for score in scores)
    return 100.0 * above / count


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Each layer's sparsity from the outlier ratios D_l (steps 2 and 3). Equal ratios leave every
    layer at the target (the reference divides by zero there)."""
    D = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(D.max() - D.min())
    if spread == 0:
        return [sparsity] * len(ratios)
    rescaled = (D - D.min()) * (1 / spread * lam * 2)
    density = rescaled - rescaled.mean() + (1 - sparsity)
    layers = [FLOOR if 1 - float(keep) <= 0 else 1 - float(keep) for keep in density]
    if max(layers) >= 1:
        raise CpsError(
            f"OWL would prune a whole layer at sparsity {sparsity:g} with lambda {lam:g}: lower --owl-lambda"
        )
    return layers
