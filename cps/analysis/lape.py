"""Language activation probability entropy (LAPE; Tang et al., ACL 2024, arXiv 2402.16438).

A neuron's activation probability per language is the share of tokens of that language on which it
fires. Normalised across languages, a low entropy means the neuron fires for few languages. Neurons
whose highest probability stays below the `filter_quantile` of all probabilities are dismissed; the
lowest-entropy `ratio` of all neurons are language-specific, each assigned to every language whose
probability exceeds that same quantile.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch


@dataclass
class LanguageNeurons:
    entropy: torch.Tensor  # (layers, neurons); +inf for dismissed neurons
    selected: torch.Tensor  # (k, 2) long: (layer, neuron) of the language-specific neurons
    assignment: dict[str, torch.Tensor]  # language -> (n, 2) long (layer, neuron)
    threshold: float  # the activation-probability quantile used to filter and assign


def lape(
    probabilities: torch.Tensor, languages: list[str], ratio: float = 0.01, filter_quantile: float = 0.95
) -> LanguageNeurons:
    """`probabilities`: (layers, neurons, languages) activation probabilities in [0, 1]."""
    if probabilities.shape[-1] != len(languages):
        raise ValueError("the last dimension must have one entry per language")
    probs = probabilities.double()
    normalised = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    logs = torch.where(normalised > 0, normalised.clamp_min(1e-300).log(), torch.zeros_like(normalised))
    entropy = -(normalised * logs).sum(-1)  # (layers, neurons)
    flat = probs.flatten()
    threshold = flat.kthvalue(max(1, round(flat.numel() * filter_quantile))).values.item()
    entropy = entropy.masked_fill((probs > threshold).sum(-1) == 0, float("inf"))
    count = max(1, round(entropy.numel() * ratio))
    order = torch.argsort(entropy.flatten(), stable=True)[:count]
    order = order[torch.isfinite(entropy.flatten()[order])]
    neurons = entropy.shape[1]
    selected = torch.stack([order // neurons, order % neurons], dim=1)
    assignment = {}
    for index, lang in enumerate(languages):
        keep = probs[selected[:, 0], selected[:, 1], index] > threshold
        assignment[lang] = selected[keep]
    return LanguageNeurons(entropy.float(), selected, assignment, threshold)


def neuron_counts(model: str, neurons: LanguageNeurons, languages: list[str]) -> pl.DataFrame:
    """(model, lang, layer, neurons): the language-specific neurons of every layer that has any."""
    rows = []
    for lang in languages:
        layers, counts = torch.unique(neurons.assignment[lang][:, 0], return_counts=True)
        rows += [(model, lang, int(layer), int(n)) for layer, n in zip(layers, counts, strict=True)]
    return pl.DataFrame(
        rows,
        schema={"model": pl.String, "lang": pl.String, "layer": pl.Int64, "neurons": pl.Int64},
        orient="row",
    )


def neuron_overlap(
    dense: LanguageNeurons,
    pruned: LanguageNeurons,
    dense_probabilities: torch.Tensor,
    pruned_probabilities: torch.Tensor,
    languages: list[str],
) -> pl.DataFrame:
    """Per language: the dense model's language-specific neurons against the pruned model's (IoU of
    the (layer, neuron) sets; 1.0 when both are empty), and the mean change of the activation
    probability of the dense model's neurons (null when it has none: no mean, not a change of 0).
    Probabilities: (layers, neurons, languages)."""
    rows = []
    change = pruned_probabilities - dense_probabilities
    for index, lang in enumerate(languages):
        before = {tuple(x) for x in dense.assignment[lang].tolist()}
        after = {tuple(x) for x in pruned.assignment[lang].tolist()}
        overlap = len(before & after) / len(before | after) if before | after else 1.0
        where = dense.assignment[lang]
        shift = change[where[:, 0], where[:, 1], index].mean().item() if len(where) else None
        rows.append((lang, len(before), len(after), overlap, shift))
    schema = {
        "lang": pl.String,
        "dense_neurons": pl.Int64,
        "pruned_neurons": pl.Int64,
        "overlap": pl.Float64,
        "prob_change": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")
