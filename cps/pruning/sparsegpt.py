"""SparseGPT (Frantar & Alistarh, ICML 2023, arXiv 2301.00774): one-shot OBS pruning with weight updates.

Columns are processed left to right in blocks of `blocksize`. Within a block, pruning column i
moves its error onto the not-yet-processed columns through the inverse Hessian (OBS update); the
block's accumulated errors reach the columns right of the block in one matmul (lazy batch update).
The mask is chosen adaptively: per block for unstructured sparsity (the lowest w^2 / [H^-1]_jj^2),
per M columns for N:M, always on the weights as updated so far.
"""

from __future__ import annotations

import logging

import torch

from cps.errors import CpsError
from cps.pruning.base import InputStats, Pruned, PruningMethod, register
from cps.pruning.masks import SparsityTarget, _prune_smallest

log = logging.getLogger(__name__)

MAX_DAMPENING = 100.0  # retries stop once the dampening exceeds this


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = dampening * mean(diag H).

    When H is too ill-conditioned for Cholesky, the dampening grows tenfold and we retry (the
    reference code crashes here instead).
    """
    mean_diag = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    while dampening <= MAX_DAMPENING:
        lower, info = torch.linalg.cholesky_ex(hessian + dampening * mean_diag * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        log.warning("SparseGPT: Cholesky failed at dampening %g; retrying at %g", dampening, dampening * 10)
        dampening *= 10
    raise CpsError(f"SparseGPT: Hessian not positive definite even at dampening {dampening:g}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: SparsityTarget,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) given H (in, in) ~ 2 X^T X / n. Returns (new W with zeros, mask)."""
    W = weight.clone().float()  # (out, in)
    H = hessian.clone().float()  # (in, in)
    rows, columns = W.shape
    dead = torch.diagonal(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, dampening)  # upper triangular (in, in)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if target.is_nm:
        group, pruned = int(target.group), target.pruned_per_group
        if columns % group:
            raise CpsError(f"N:M with M={group} needs input width divisible by {group} (got {columns})")
        blocksize = max(group, blocksize - blocksize % group)  # groups never straddle blocks
    to_prune = rows * columns * target.sparsity
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = W[:, start:end].clone()  # (out, B)
        Hinv1 = Hinv[start:end, start:end]  # (B, B)
        d = torch.diagonal(Hinv1)  # (B,)
        errors = torch.zeros_like(W1)  # (out, B)
        if target.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # an exact share of the whole matrix's count, chosen over this block
            count = int(to_prune * end / columns) - int(to_prune * start / columns)
            scores = (W1**2 / d.reshape(1, -1) ** 2).reshape(1, -1)
            mask1 = _prune_smallest(scores, count).reshape(W1.shape)
        for i in range(end - start):
            if target.is_nm and i % group == 0:
                scores = W1[:, i : i + group] ** 2 / d[i : i + group].reshape(1, -1) ** 2
                mask1[:, i : i + group] = _prune_smallest(scores, pruned)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / d[i]  # (out,)
            W1[:, i + 1 :] -= err.reshape(-1, 1) * Hinv1[i, i + 1 :].reshape(1, -1)
            W1[:, i] = q
            errors[:, i] = err
        W[:, start:end] = W1
        mask[:, start:end] = mask1
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return W, mask


@register("sparsegpt")
class SparseGPT(PruningMethod):
    updates_weights = True
    needs_gram = True
    logged_options = ("blocksize", "dampening")

    def prune(self, weight: torch.Tensor, stats: InputStats, target: SparsityTarget) -> Pruned:
        hessian = stats.require_gram() * (2 / max(stats.tokens, 1))  # H = 2 X^T X / n
        new_weight, mask = sparsegpt_prune(
            weight, hessian, target, self.options.blocksize, self.options.dampening
        )
        return Pruned(mask, new_weight)
