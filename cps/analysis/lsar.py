"""Language-specific vs language-agnostic subspaces (LSAR; Xie et al., 2022, arXiv 2210.14464).

Per layer, the per-language mean hidden states M (languages x d) give a language-agnostic part (their
mean) and, from the SVD of the centred means, a rank-r subspace that separates the languages.
A deviation (pruned - dense hidden state) splits into its projection on that subspace (what pruning
changed about language identity) and the orthogonal rest.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians) between the spans of two orthonormal bases (d, r_a), (d, r_b)."""
    cosines = torch.linalg.svdvals(a.T.double() @ b.double()).clamp(-1, 1)
    return torch.arccos(cosines)
