"""Language-specific vs language-agnostic subspaces (LSAR; Xie et al., 2022, arXiv 2210.14464).

Per layer, the per-language mean hidden states M (languages x d) give a language-agnostic part (their
mean) and, from the SVD of the centred means, a rank-r subspace that separates the languages.
A deviation (pruned - dense hidden state) splits into its projection on that subspace (what pruning
changed about language identity) and the orthogonal rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch


@dataclass
class LanguageSubspace:
    agnostic: torch.Tensor  # (d,) mean over languages of the per-language means
    basis: torch.Tensor  # (d, r) orthonormal basis of the language-specific subspace
    singular_values: torch.Tensor  # (r,)


def language_subspace(means: torch.Tensor, rank: int | None = None) -> LanguageSubspace:
    """`means`: (languages, d). Default rank: languages - 1 (the most centred means can span)."""
    languages = means.shape[0]
    rank = languages - 1 if rank is None else rank
    if not 0 < rank < languages:
        raise ValueError(f"rank must be in [1, {languages - 1}] for {languages} languages")
    agnostic = means.mean(0)
    centred = (means - agnostic).double()  # (languages, d)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    return LanguageSubspace(agnostic.to(means.dtype), right[:rank].T.to(means.dtype), singular[:rank])


def split_deviation(delta: torch.Tensor, subspace: LanguageSubspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of each deviation (..., d) inside and outside the language-specific subspace."""
    inside = delta @ subspace.basis  # (..., r) coordinates in the orthonormal basis
    specific = (inside**2).sum(-1)
    return specific, (delta**2).sum(-1) - specific


def split_second_moment(
    second_moment: torch.Tensor, noise: torch.Tensor, tokens: int, subspaces: list[LanguageSubspace]
) -> pl.DataFrame:
    """Per layer, the mean squared deviation inside each layer's language-specific subspace
    (tr(U^T C U) / n for C = sum delta delta^T) and outside it (the rest of ||delta||^2 / n), and the
    specific share. `second_moment`: (layers, d, d); `noise`: (layers,) sum ||delta||^2."""
    rows = []
    for layer, subspace in enumerate(subspaces):
        basis = subspace.basis.double()
        specific = torch.trace(basis.T @ second_moment[layer].double() @ basis).item() / tokens
        total = noise[layer].item() / tokens
        rows.append((layer, specific, total - specific))
    frame = pl.DataFrame(rows, schema=["layer", "specific", "agnostic"], orient="row")
    share = pl.col("specific") / (pl.col("specific") + pl.col("agnostic")).clip(lower_bound=1e-30)
    return frame.with_columns(share.alias("specific_share"))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians) between the spans of two orthonormal bases (d, r_a), (d, r_b)."""
    cosines = torch.linalg.svdvals(a.T.double() @ b.double()).clamp(-1, 1)
    return torch.arccos(cosines)
