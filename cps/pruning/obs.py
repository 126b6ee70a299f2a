"""What SparseGPT (arXiv 2301.00774) and GPTQ (arXiv 2210.17323) share: the Optimal Brain Surgeon
column loop over W with the upper Cholesky factor of the dampened inverse Hessian, lazy batch
updates, and that factor's computation.

Columns are processed left to right in blocks of `blocksize`. Within a block, each column's
weights take their new values (0 where pruned, the grid point where quantized, both for the joint
mode), and the column's error moves onto the not-yet-processed columns through the inverse
Hessian (OBS update); the block's accumulated errors reach the columns right of the block in one
matmul (lazy batch update). A pruning mask is chosen adaptively: per block for unstructured
sparsity (the lowest w^2 / [H^-1]_jj^2), per M columns for N:M, always on the weights as updated so
far; a fixed mask (`keep_zeros`: a pruned model's zeros) is held instead.
"""

from __future__ import annotations

import logging

import torch

from cps.errors import CpsError
from cps.pruning.masks import SparsityTarget, _prune_smallest
from cps.pruning.quant import ColumnRounder

log = logging.getLogger(__name__)

MAX_DAMPENING = 100.0  # retries stop once the dampening exceeds this
SUB_BLOCK = 16  # columns per rank-1 sub-block inside a block


TRIANGULAR_BASE = 128  # below this size a triangular inverse is one LAPACK solve


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 for a lower-triangular L, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1,
    C^-1]]. Two thirds of the arithmetic of solving L X = I (which cannot skip the identity's
    zeros), in matrix products: 2.2-2.7x faster at 640-2048 on a CPU, as accurate."""
    n = lower.shape[0]
    if n <= TRIANGULAR_BASE:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = n // 2
    first, last = lower_triangular_inverse(lower[:half, :half]), lower_triangular_inverse(lower[half:, half:])
    inverse = torch.zeros_like(lower)
    inverse[:half, :half] = first
    inverse[half:, half:] = last
    inverse[half:, :half] = torch.mm(last, lower[half:, :half]).mm(first).neg_()
    return inverse


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = dampening * mean(diag H).

    The reference takes the Cholesky factor of H, inverts H with it, and factors the inverse
    again. With J the order-reversing permutation and J H J = C C^T (C lower), H = (J C J)(J C J)^T
    with J C J upper, so H^-1 = U^T U for U = (J C J)^-1 = J C^-1 J, upper with a positive
    diagonal: the same unique factor from one Cholesky and one triangular inverse (by halves:
    `lower_triangular_inverse`), as close to the float64 factor.

    When H is too ill-conditioned for Cholesky, the dampening grows tenfold and we retry (the
    reference code crashes here instead).
    """
    mean_diag = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    while dampening <= MAX_DAMPENING:
        lower, info = torch.linalg.cholesky_ex((hessian + dampening * mean_diag * eye).flip(0, 1))
        if info.item() == 0:
            upper = lower_triangular_inverse(lower).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper
        log.warning("OBS: Cholesky failed at dampening %g; retrying at %g", dampening, dampening * 10)
        dampening *= 10
    raise CpsError(f"Hessian not positive definite even at dampening {dampening:g}")


def hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of the dampened inverse of H (in, in), and the inputs
    that never fire (zero diagonal: their weights cannot matter; H gets 1 there). The same for
    every linear reading the same inputs (q, k and v; gate and up)."""
    H = hessian.clone().float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    return inverse_hessian_factor(H, dampening), dead


def obs_columns(
    weight: torch.Tensor,
    factor: tuple[torch.Tensor, torch.Tensor],
    blocksize: int = 128,
    target: SparsityTarget | None = None,
    rounder: ColumnRounder | None = None,
    keep_zeros: torch.Tensor | None = None,
    splits: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (out, in) through the column loop with `factor` = `hessian_factor(H)` (its columns in the
    order W's are). Prunes to `target` (SparseGPT), rounds each column with `rounder` (GPTQ), or
    both at once (the joint mode: a pruned weight rounds to 0); `keep_zeros` (out, in) is a fixed
    mask held at 0 instead of a chosen one. Returns (new W, mask or None when nothing was masked).

    With `splits`, W is several linears of the same inputs stacked by rows (their row counts):
    rows are processed independently by the algorithm, so one pass over the columns serves them
    all, and each linear's unstructured mask is chosen among its own rows, as if pruned alone."""
    # The loop runs on W^T (in, out): a column of W is a contiguous row there, so each column's
    # error and its rank-1 update read and write contiguous memory.
    # (a copy always: W^T of a one-row W is already contiguous, and `.contiguous()` would alias it)
    WT = weight.float().T.clone(memory_format=torch.contiguous_format)  # (in, out)
    Hinv, dead = factor  # U: (in, in)
    columns, rows = WT.shape
    WT[dead] = 0
    prune = target is not None and target.sparsity > 0
    fixedT = keep_zeros.T.contiguous() if keep_zeros is not None and not prune else None
    masked = prune or fixedT is not None
    maskT = torch.zeros_like(WT, dtype=torch.bool) if masked else None
    nm = prune and target.is_nm
    if nm:
        group, pruned = int(target.group), target.pruned_per_group
        if columns % group:
            raise CpsError(f"N:M with M={group} needs input width divisible by {group} (got {columns})")
        blocksize = max(group, blocksize - blocksize % group)  # groups never straddle blocks
    # Inside a block, updates are lazy once more: rank-1 within sub-blocks of `step` columns, one
    # matmul from each sub-block to the rest of the block (the same sums in another order);
    # N:M groups never straddle sub-blocks.
    step = group * max(1, SUB_BLOCK // group) if nm else SUB_BLOCK
    splits = splits or [rows]
    to_prune = [part * columns * target.sparsity for part in splits] if prune else []
    scratch = WT.new_empty(rows)  # a rounded column
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = WT[start:end]  # (B, out): a view, updated in place
        Hinv1 = Hinv[start:end, start:end]  # (B, B)
        d = torch.diagonal(Hinv1)  # (B,)
        diagonal = d.tolist()
        errors = torch.zeros_like(W1)  # (B, out)
        mask1 = None
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        elif prune:  # per linear: an exact share of its whole count, chosen over this block
            scores = W1.T**2 / d.reshape(1, -1) ** 2  # (over W's (out, B), as the reference ranks)
            parts = []
            for part, total in zip(scores.split(splits), to_prune, strict=True):
                count = int(total * end / columns) - int(total * start / columns)
                parts.append(_prune_smallest(part.reshape(1, -1), count).reshape(part.shape))
            mask1 = torch.cat(parts).T.contiguous()
        elif fixedT is not None:
            mask1 = fixedT[start:end]
        # pruning alone: the error of column i is w * 1 / d where pruned, 0 where kept
        pruned_share = mask1.float() if mask1 is not None and rounder is None else None
        width = end - start
        for first in range(0, width, step):
            last = min(first + step, width)
            for i in range(first, last):
                if nm and i % group == 0:
                    scores = W1[i : i + group].T ** 2 / d[i : i + group].reshape(1, -1) ** 2
                    mask1[i : i + group] = _prune_smallest(scores, pruned).T
                    if pruned_share is not None:
                        pruned_share[i : i + group] = mask1[i : i + group]
                if rounder is None:
                    # the pruned weights' error (zero where kept); column i itself is zeroed
                    # where pruned at the end of the block
                    err = torch.mul(W1[i], pruned_share[i], out=errors[i]).div_(diagonal[i])  # (out,)
                else:  # the column takes its grid values (0 where masked); err = (w - q) / d
                    q = rounder(start + i, W1[i], scratch)
                    if mask1 is not None:
                        q.masked_fill_(mask1[i], 0)
                    err = torch.sub(W1[i], q, out=errors[i]).div_(diagonal[i])
                    W1[i].copy_(q)
                if i + 1 < last:  # spread over the sub-block's later columns by a rank-1 update
                    W1[i + 1 : last].addr_(Hinv1[i, i + 1 : last], err, alpha=-1)
            if last < width:  # the sub-block's errors reach the rest of the block at once
                W1[last:].addmm_(Hinv1[first:last, last:].T, errors[first:last], alpha=-1)
        if mask1 is not None:
            W1.masked_fill_(mask1, 0)
            maskT[start:end] = mask1
        WT[end:].addmm_(Hinv[start:end, end:].T, errors, alpha=-1)
    return WT.T.contiguous(), None if maskT is None else maskT.T.contiguous()
