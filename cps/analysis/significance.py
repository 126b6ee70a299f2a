"""Is calibrating on the evaluation language better than calibrating on another one? A paired
bootstrap over the same items (documents, for perplexity), two-level when cells have several seeds.

For two calibration languages A and B evaluated on the same n items, with k_A and k_B seeds:
  1. each replicate draws n items with replacement (one draw for both sides: the pairing) and, per
     side, its seeds with replacement (seeds are not paired: a seed fixes which calibration windows a
     language drew), expressed as multinomial counts, so a replicate is two weighted sums;
  2. the statistic per side: accuracy = the mean correctness over the drawn seeds and items;
     perplexity = exp(sum NLL / sum tokens) over the drawn documents, averaged over the drawn seeds;
  3. the difference A - B is the observed one; its 95% interval the 2.5th and 97.5th percentiles of
     the replicates' differences (percentile bootstrap, 10,000 replicates, seeded); it is
     significant when the interval excludes 0 and there are at least MIN_ITEMS (30) shared items;
     a comparison on fewer is too small to test (its percentile interval understates the spread).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

RESAMPLES = 10_000
CONFIDENCE = 0.95
MIN_ITEMS = 30  # below this a comparison is listed as too small, never tested


@dataclass(frozen=True)
class Comparison:
    difference: float  # statistic(A) - statistic(B), observed
    low: float
    high: float
    items: int

    @property
    def significant(self) -> bool:
        return self.items >= MIN_ITEMS and (self.low > 0 or self.high < 0)


def resample_counts(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """(resamples, size) how often each of `size` units is drawn in each replicate."""
    return rng.multinomial(size, np.full(size, 1 / size), size=resamples).astype(np.float64)


def weighted_means(correct: np.ndarray, seeds: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per replicate: the weighted mean of `correct` (k, n: 0/1 or any per-item score) under seed
    (R, k) and item (R, n) counts."""
    per_seed = correct @ items.T  # (k, R): correct answers among the drawn items
    return (seeds * per_seed.T).sum(1) / (seeds.sum(1) * items.sum(1))


def _perplexity(nll: np.ndarray, tokens: np.ndarray, seeds: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per replicate: exp(sum NLL / sum tokens) over the drawn documents, mean over drawn seeds."""
    per_seed = np.exp((nll @ items.T) / (tokens @ items.T))  # (k, R)
    return (seeds * per_seed.T).sum(1) / seeds.sum(1)


def paired_bootstrap(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """A vs B on the same items. Each side holds one per-item score (k, n) compared by its mean
    (`correct` for accuracy, `margin`), or `nll` and `tokens` (k, n) per document for perplexity;
    k may differ between the sides, n may not."""
    kind = "nll" if "nll" in a else next(iter(a))
    n = a[kind].shape[1]
    if b[kind].shape[1] != n:
        raise ValueError(f"paired sides need the same items (got {n} and {b[kind].shape[1]})")
    rng = np.random.default_rng(seed)
    items = resample_counts(rng, n, resamples)
    seeds_a, seeds_b = (
        resample_counts(rng, a[kind].shape[0], resamples),
        resample_counts(rng, b[kind].shape[0], resamples),
    )
    once_items, once_a, once_b = (
        np.ones((1, n)),
        np.ones((1, a[kind].shape[0])),
        np.ones((1, b[kind].shape[0])),
    )
    if kind != "nll":
        replicates = weighted_means(a[kind], seeds_a, items) - weighted_means(b[kind], seeds_b, items)
        observed = weighted_means(a[kind], once_a, once_items) - weighted_means(b[kind], once_b, once_items)
    else:
        replicates = _perplexity(a["nll"], a["tokens"], seeds_a, items) - _perplexity(
            b["nll"], b["tokens"], seeds_b, items
        )
        observed = _perplexity(a["nll"], a["tokens"], once_a, once_items) - _perplexity(
            b["nll"], b["tokens"], once_b, once_items
        )
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Comparison(float(observed[0]), float(low), float(high), n)


def own_language_comparisons(
    items: pl.DataFrame, value: str, resamples: int = RESAMPLES, seed: int = 0
) -> pl.DataFrame:
    """For every (task, eval_lang) whose own calibration language is present: own vs each other
    calibration language. `items`: long rows (calib_lang, seed, task, eval_lang, item, <value>),
    value `correct` (accuracy: own - other, higher is better), `margin` (likewise) or `nll` with
    `tokens` (perplexity: own - other, lower is better). Returns (task, eval_lang, other, items,
    difference, low, high, significant, own_better) with `items` the number of shared items."""
    columns = ["nll", "tokens"] if value == "nll" else [value]
    rows = []
    for (task, lang), cell in items.group_by("task", "eval_lang", maintain_order=True):
        runs = cell.select("calib_lang", "seed").n_unique()
        shared = cell.group_by("item").agg(pl.struct("calib_lang", "seed").n_unique().alias("runs"))
        order = sorted(shared.filter(pl.col("runs") == runs)["item"].to_list())  # items every run scored
        if not order:
            continue
        sides = {}
        for calib, part in cell.group_by("calib_lang"):
            sides[calib[0]] = {
                column: part.pivot(on="item", index="seed", values=column)
                .select([str(i) for i in order])
                .to_numpy()
                .astype(np.float64)
                for column in columns
            }
        if lang not in sides:
            continue
        for other in sorted(set(sides) - {lang}):
            result = paired_bootstrap(sides[lang], sides[other], resamples, seed)
            better = result.difference < 0 if value == "nll" else result.difference > 0
            interval = (result.difference, result.low, result.high)
            rows.append((task, lang, other, result.items, *interval, result.significant, better))
    schema = {
        "task": pl.String,
        "eval_lang": pl.String,
        "other": pl.String,
        "items": pl.Int64,
        "difference": pl.Float64,
        "low": pl.Float64,
        "high": pl.Float64,
        "significant": pl.Boolean,
        "own_better": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def summary(comparisons: pl.DataFrame) -> pl.DataFrame:
    """Per task family: in how many evaluation languages own-language calibration is significantly
    better than every other calibration language, and in how many significantly worse than at
    least one. (task, languages, wins, losses, line)."""
    rows = []
    for (task,), part in comparisons.group_by("task", maintain_order=True):
        per_lang = part.group_by("eval_lang").agg(
            (pl.col("significant") & pl.col("own_better")).all().alias("wins"),
            (pl.col("significant") & ~pl.col("own_better")).any().alias("losses"),
        )
        wins, losses, total = int(per_lang["wins"].sum()), int(per_lang["losses"].sum()), per_lang.height
        line = (
            f"own-language calibration wins significantly in {wins} of {total} languages, "
            f"loses significantly in {losses}"
        )
        rows.append((task, total, wins, losses, line))
    return pl.DataFrame(rows, schema=["task", "languages", "wins", "losses", "line"], orient="row")
