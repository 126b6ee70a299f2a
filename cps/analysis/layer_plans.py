"""Layer plans across calibration languages: does the calibration language move where a model is pruned?

- OWL (Yin et al., ICML 2024, arXiv 2310.05175) gives each decoder layer its own sparsity from the
  layer's outlier ratio D_l on the calibration tokens, around the target (a plan's range
  over the layers is 2 * lambda unless a layer hits OWL's floor). `owl_spread` sets the plans of
  the calibration languages side by side: per layer the spread of the allocated sparsity across
  languages (max - min), against that range, and per pair of languages the Spearman rank
  correlation of the two layer profiles (do the languages rank the layers alike?).
- ShortGPT (Men et al., 2024, arXiv 2403.03853) removes the decoder layers of lowest Block
  Influence; `removed_layer_overlap` compares the removed sets: the Jaccard overlap of every pair
  of languages, the layers every language removes, those some language removes, and how often
  each layer goes.

Keys are the varied values of a comparison group (calibration languages), as in `masks_overlap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import polars as pl


@dataclass(frozen=True)
class OwlSpread:
    """OWL's layer plans of a group's members."""

    layers: pl.DataFrame  # (lang, layer, sparsity, outlier_ratio): one row per language and layer
    summary: pl.DataFrame  # (layer, mean, min, max, spread, sd): allocated sparsity across languages
    rank_pairs: pl.DataFrame  # (lang_a, lang_b, spearman): rank correlation of two sparsity profiles


def owl_spread(targets: dict[str, list[float]], ratios: dict[str, list[float]]) -> OwlSpread:
    """The allocated sparsities (`owl.sparsity_target.layer`) and outlier ratios (D_l in percent,
    `owl.outlier_ratio.layer`) of each language, one value per decoder layer, compared.

    `summary.sd` is the sample standard deviation across languages (ddof 1). `spearman` is the
    Pearson correlation of average ranks (ties share a rank); NaN where a profile is constant.
    The sparsity falls as D_l rises, so D's profiles rank the layers the same way, up to the floor
    OWL puts under a layer (ties)."""
    if targets.keys() != ratios.keys():
        raise ValueError(f"targets for {sorted(targets)} but outlier ratios for {sorted(ratios)}")
    lengths = {len(values) for values in [*targets.values(), *ratios.values()]}
    if len(lengths) != 1:
        raise ValueError(f"layer series of different lengths: {sorted(lengths)}")
    layers = pl.DataFrame(
        [
            (lang, layer, float(sparsity), float(ratio))
            for lang in sorted(targets)
            for layer, (sparsity, ratio) in enumerate(zip(targets[lang], ratios[lang], strict=True))
        ],
        schema={"lang": pl.String, "layer": pl.Int64, "sparsity": pl.Float64, "outlier_ratio": pl.Float64},
        orient="row",
    )
    sparsity = pl.col("sparsity")
    summary = (
        layers.group_by("layer")
        .agg(
            sparsity.mean().alias("mean"),
            sparsity.min().alias("min"),
            sparsity.max().alias("max"),
            (sparsity.max() - sparsity.min()).alias("spread"),
            sparsity.std().alias("sd"),
        )
        .sort("layer")
    )
    pairs = [
        (lang_a, lang_b, _spearman(targets[lang_a], targets[lang_b]))
        for lang_a, lang_b in combinations(sorted(targets), 2)
    ]
    rank_pairs = pl.DataFrame(
        pairs, schema={"lang_a": pl.String, "lang_b": pl.String, "spearman": pl.Float64}, orient="row"
    )
    return OwlSpread(layers, summary, rank_pairs)


def _spearman(a: list[float], b: list[float]) -> float:
    frame = pl.DataFrame({"a": a, "b": b}, schema={"a": pl.Float64, "b": pl.Float64})
    return float(frame.select(pl.corr("a", "b", method="spearman")).item())


def owl_headlines(spread: OwlSpread, lam: float | None = None) -> dict[str, float]:
    """owl.sparsity_spread.max (the largest spread of a layer's allocated sparsity across languages),
    .max_layer (its layer, the first of ties), .mean (over layers), .max_over_range (the largest
    spread over OWL's own range 2 * lambda, with `lam`); owl.spearman.mean (over language pairs
    whose profiles are not constant)."""
    summary = spread.summary
    widest = summary.sort("spread", "layer", descending=[True, False]).row(0, named=True)
    headlines = {
        "owl.sparsity_spread.max": float(widest["spread"]),
        "owl.sparsity_spread.max_layer": float(widest["layer"]),
        "owl.sparsity_spread.mean": float(summary["spread"].mean()),
    }
    if lam is not None:
        headlines["owl.sparsity_spread.max_over_range"] = float(widest["spread"]) / (2 * lam)
    rho = spread.rank_pairs["spearman"].fill_nan(None).drop_nulls()
    if len(rho):
        headlines["owl.spearman.mean"] = float(rho.mean())
    return headlines


@dataclass(frozen=True)
class RemovedOverlap:
    """The removed decoder layers of a group's members."""

    grid: pl.DataFrame  # (lang, layer, removed): every language x every decoder layer
    layers: pl.DataFrame  # (layer, removed_by, share, every, some): per layer, over the languages
    pairs: pl.DataFrame  # (lang_a, lang_b, shared, union, jaccard): per pair of languages


def removed_layer_overlap(removed: dict[str, list[int]], layers: int) -> RemovedOverlap:
    """The removed-layer sets of each language (decoder-layer indices in [0, layers)) compared.

    `removed_by` counts the languages that remove a layer, `share` = removed_by / languages,
    `every`: all of them, `some`: at least one. Jaccard = |A & B| / |A | B|, 1.0 when neither
    language removes anything (as `mask_iou`)."""
    for lang, indices in removed.items():
        outside = sorted(index for index in indices if not 0 <= index < layers)
        if outside:
            raise ValueError(f"{lang}: removed layers {outside} outside the model's {layers} layers")
    sets = {lang: set(indices) for lang, indices in removed.items()}
    langs = sorted(sets)
    grid = pl.DataFrame(
        [(lang, layer, layer in sets[lang]) for lang in langs for layer in range(layers)],
        schema={"lang": pl.String, "layer": pl.Int64, "removed": pl.Boolean},
        orient="row",
    )
    counted = grid.group_by("layer").agg(pl.col("removed").sum().cast(pl.Int64).alias("removed_by"))
    per_layer = counted.sort("layer").with_columns(
        (pl.col("removed_by") / len(langs)).alias("share"),
        (pl.col("removed_by") == len(langs)).alias("every"),
        (pl.col("removed_by") > 0).alias("some"),
    )
    rows = []
    for lang_a, lang_b in combinations(langs, 2):
        shared, union = len(sets[lang_a] & sets[lang_b]), len(sets[lang_a] | sets[lang_b])
        rows.append((lang_a, lang_b, shared, union, 1.0 if union == 0 else shared / union))
    schema = {
        "lang_a": pl.String,
        "lang_b": pl.String,
        "shared": pl.Int64,
        "union": pl.Int64,
        "jaccard": pl.Float64,
    }
    return RemovedOverlap(grid, per_layer, pl.DataFrame(rows, schema=schema, orient="row"))


def removed_headlines(overlap: RemovedOverlap) -> dict[str, float]:
    """removed_layers.jaccard.mean (over language pairs, where there is one), removed_layers.common
    (layers every language removes), removed_layers.some (layers at least one language removes)."""
    headlines = {
        "removed_layers.common": float(overlap.layers["every"].sum()),
        "removed_layers.some": float(overlap.layers["some"].sum()),
    }
    if overlap.pairs.height:
        headlines["removed_layers.jaccard.mean"] = float(overlap.pairs["jaccard"].mean())
    return headlines
