"""The paper's claims decided with intervals and power: which tasks can decide anything, the pooled
own-language effect with its verdict, and one verdict per claim (arXiv 2408.14398).

Protocols (every function below states its own; the report prints them):

- **Above chance.** A task x language can decide a claim only when the dense model answers it
  better than chance: one-sided exact test of its correct answers against the number a guesser
  gets (each item's chance 1 / its number of choices: a Poisson binomial, the binomial when all
  items have as many choices), p < ALPHA.
- **Pooled own-language effect** per setting (model, method, pattern, sparsity) and task family,
  over the informative evaluation languages L that have their own calibration and another:
  effect_L = score(calibrated on L) - mean over the other calibration languages c of score(c),
  on the items every one of those runs scored (paired); pooled = the mean of effect_L over the
  languages. Its 95% interval: percentile bootstrap, RESAMPLES replicates (seeded), each drawing the
  languages with replacement and, for every drawn language, its items with replacement (one draw
  for all calibration languages: the pairing) and each calibration language's seeds with
  replacement.
- **Verdict**: better (interval above 0), worse (below 0), equivalent (inside +-delta), else
  inconclusive, with the smallest effect the data could have detected: (z_0.975 + z_0.8) x the
  bootstrap standard error (80% power, two-sided 5%). A language enters with at least
  LANGUAGE_ITEMS shared items; a pooled effect on fewer than MIN_ITEMS items in all is too small to
  test.
- **Counts of cells** (claims 1 and 2): in how many (setting, language) cells the own calibration
  language is the best of the calibration languages; the share with its Wilson 95% interval;
  reproduced when the interval lies above one half (own is best in most cells), contradicted when
  below, else inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from cps.analysis.masks_overlap import PAPER_LOW_IOU_MODULES, lowest_overlap_modules, paper_agrees
from cps.analysis.significance import MIN_ITEMS, resample_counts, weighted_means
from cps.evaluation.tasks import wilson_interval
from cps.metrics import MARGIN_OF, SHOWN_SCORE, split_task

ALPHA = 0.05
DELTA = 0.02  # equivalence margin of an accuracy effect: 2 accuracy points
RESAMPLES = 10_000
LANGUAGE_ITEMS = 10  # shared items a language needs to enter a pooled effect
AGNOSTIC_BAND = 0.10  # claim 5: a relative change of the agnostic error within +-10% is "about the same"
POWER_Z = 1.959963984540054 + 0.8416212335729143  # two-sided 5%, 80% power


# ---------------------------------------------------------------------------------------------
# Above chance


def shown_answers(items: pl.DataFrame, task: str) -> pl.DataFrame | None:
    """One task's `items/<task>.parquet` as the findings read it: (task: the family, eval_lang,
    item, correct: the score the family's accuracy reads, margin: the gold choice's margin under
    that score (null for items written before margins existed), n_choices (null: generative)),
    plus any run_id column. None for a task without a language or without that score."""
    family = split_task(task)[0]
    shown = SHOWN_SCORE.get(family, "acc")
    if "lang" not in items.columns or items["lang"].null_count() or shown not in items.columns:
        return None
    margin = MARGIN_OF.get(shown, "")
    return items.select(
        *(["run_id"] if "run_id" in items.columns else []),
        pl.lit(family).alias("task"),
        pl.col("lang").alias("eval_lang"),
        pl.col("item").cast(pl.Int64),
        pl.col(shown).cast(pl.Float64).alias("correct"),
        (pl.col(margin) if margin in items.columns else pl.lit(None)).cast(pl.Float64).alias("margin"),
        (pl.col("choices").list.len() if "choices" in items.columns else pl.lit(None))
        .cast(pl.Int64)
        .alias("n_choices"),
    )


def above_chance_p(successes: int, chances: Sequence[float]) -> float:
    """P(X >= successes) for X the number of correct answers of a guesser who answers item i right
    with probability chances[i] (exact: the Poisson binomial distribution, by convolution)."""
    distribution = np.ones(1)
    for p in chances:
        step = np.zeros(distribution.size + 1)
        step[:-1] += distribution * (1 - p)
        step[1:] += distribution * p
        distribution = step
    return float(min(1.0, distribution[max(0, successes) :].sum()))


def chance_tests(items: pl.DataFrame) -> pl.DataFrame:
    """Per (task, eval_lang) of one model's items (correct: 0/1, n_choices): items, accuracy, chance,
    p (one-sided exact, above chance) and informative (p < ALPHA). Generative items (no choices)
    have no chance level: informative is null for them."""
    rows = []
    for (task, lang), part in items.group_by("task", "eval_lang", maintain_order=True):
        correct = part["correct"].to_numpy()
        choices = part["n_choices"].to_list() if "n_choices" in part.columns else [None]
        if any(c is None or c < 2 for c in choices):
            rows.append((task, lang, len(correct), float(correct.mean()), None, None, None))
            continue
        chances = [1 / c for c in choices]
        p = above_chance_p(round(float(correct.sum())), chances)
        chance = sum(chances) / len(chances)
        rows.append((task, lang, len(correct), float(correct.mean()), chance, p, p < ALPHA))
    schema = {
        "task": pl.String,
        "eval_lang": pl.String,
        "items": pl.Int64,
        "accuracy": pl.Float64,
        "chance": pl.Float64,
        "p": pl.Float64,
        "informative": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


# ---------------------------------------------------------------------------------------------
# Pooled own-language effect


def verdict(low: float, high: float, delta: float) -> str:
    """better / worse: the interval excludes 0; equivalent: it lies inside (-delta, delta)."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if -delta < low and high < delta:
        return "equivalent"
    return "inconclusive"


@dataclass(frozen=True)
class Pooled:
    effect: float  # mean over languages of own - mean(others)
    low: float
    high: float
    se: float  # bootstrap standard error
    items: int  # shared items, summed over the languages
    per_language: dict[str, float]  # effect_L
    too_small: tuple[str, ...] = ()  # languages left out: fewer than LANGUAGE_ITEMS shared items

    @property
    def detectable(self) -> float:
        """The smallest effect these data detect with 80% power at two-sided 5%."""
        return POWER_Z * self.se

    def verdict(self, delta: float) -> str:
        return verdict(self.low, self.high, delta)


def _language_effect(
    cell: pl.DataFrame, lang: str, value: str, rng: np.random.Generator, resamples: int, slots: int
) -> tuple[float, np.ndarray, int] | None:
    """effect_L observed and per (replicate, slot): `slots` independent item (and seed) draws per
    replicate, one for each place the language may take in a replicate's draw of languages; and
    the number of shared items. None when L has no own calibration or no other, or too few shared
    items."""
    calibs = sorted(cell["calib_lang"].unique().to_list())
    if lang not in calibs or len(calibs) < 2:
        return None
    runs = cell.select("calib_lang", "seed").n_unique()
    shared = cell.group_by("item").agg(pl.struct("calib_lang", "seed").n_unique().alias("runs"))
    order = sorted(shared.filter(pl.col("runs") == runs)["item"].to_list())
    n = len(order)
    if n < LANGUAGE_ITEMS:
        return None
    draws = resample_counts(rng, n, resamples * slots)
    observed, replicated = {}, {}
    for calib in calibs:
        part = cell.filter(pl.col("calib_lang") == calib)
        matrix = (
            part.pivot(on="item", index="seed", values=value, aggregate_function="first")
            .select([str(i) for i in order])
            .to_numpy()
            .astype(np.float64)
        )
        seeds = resample_counts(rng, matrix.shape[0], resamples * slots)
        replicated[calib] = weighted_means(matrix, seeds, draws)
        observed[calib] = float(matrix.mean())
    others = [c for c in calibs if c != lang]
    effect = observed[lang] - sum(observed[c] for c in others) / len(others)
    replicates = replicated[lang] - sum(replicated[c] for c in others) / len(others)
    return effect, replicates.reshape(resamples, slots), n


def pooled_effect(
    frame: pl.DataFrame,
    value: str,
    languages: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Pooled | None:
    """The own-language effect of one setting and task family, pooled over `languages` (default:
    every evaluation language in `frame`). `frame`: (calib_lang, seed, eval_lang, item, <value>).
    None when no language has its own calibration, another one and LANGUAGE_ITEMS shared items, or
    the languages that do share fewer than MIN_ITEMS items in all.

    Each replicate draws as many languages as there are, with replacement, and for every drawn
    language its own item (and seed) draw, so that a language drawn twice counts as two
    independent samples of its items."""
    rng = np.random.default_rng(seed)
    wanted = sorted(frame["eval_lang"].unique().to_list()) if languages is None else sorted(languages)
    candidates = [
        lang for lang in wanted if lang in frame.filter(pl.col("eval_lang") == lang)["calib_lang"].to_list()
    ]
    slots = max(1, len(candidates))
    effects: dict[str, float] = {}
    replicates: list[np.ndarray] = []
    total, too_small = 0, []
    for lang in candidates:
        cell = frame.filter(pl.col("eval_lang") == lang)
        found = _language_effect(cell, lang, value, rng, resamples, slots)
        if found is None:
            if cell["calib_lang"].n_unique() > 1:
                too_small.append(lang)
            continue
        effects[lang], per_replicate, n = found
        replicates.append(per_replicate)
        total += n
    if not effects or total < MIN_ITEMS:
        return None
    count = len(effects)
    stacked = np.stack([r[:, :count] for r in replicates])  # (languages, R, slots)
    drawn = rng.integers(0, count, size=(resamples, count))  # which language fills each slot
    pooled = stacked[drawn, np.arange(resamples)[:, None], np.arange(count)[None, :]].mean(1)
    low, high = np.percentile(pooled, [2.5, 97.5])
    effect = sum(effects.values()) / count
    return Pooled(
        effect, float(low), float(high), float(pooled.std(ddof=1)), total, effects, tuple(too_small)
    )


def equivalence_margin(dense_margins: Sequence[float], delta: float = DELTA) -> float | None:
    """The margin shift that moves about `delta` of the items across the decision boundary: the
    (2 x delta) quantile of |margin| over the dense model's items (a shift by it flips about delta
    of them one way). None without items."""
    values = np.abs(np.asarray([m for m in dense_margins if m is not None and math.isfinite(m)]))
    if values.size == 0:
        return None
    return float(np.quantile(values, min(1.0, 2 * delta)))


# ---------------------------------------------------------------------------------------------
# Claims


@dataclass
class Finding:
    claim: str
    verdict: str  # reproduced | contradicted | inconclusive | no data
    number: str  # the figure behind the verdict
    interval: str  # its 95% interval
    covers: str  # models, methods and languages
    evidence: str  # the report section holding the evidence (its anchor)
    detail: str = ""  # the smallest detectable effect, or what is missing


def claim_verdict(reproduced: bool, contradicted: bool) -> str:
    return "reproduced" if reproduced else "contradicted" if contradicted else "inconclusive"


def share_verdict(wins: int, cells: int) -> tuple[str, float, float]:
    """Most cells or not: reproduced when the Wilson interval of wins / cells lies above 1/2,
    contradicted when below, else inconclusive."""
    low, high = wilson_interval(wins, cells)
    return claim_verdict(cells > 0 and low > 0.5, cells > 0 and high < 0.5), low, high


def wins_needed(cells: int) -> int | None:
    """The fewest wins out of `cells` whose Wilson interval lies above 1/2 (None: none would)."""
    return next((k for k in range(cells + 1) if wilson_interval(k, cells)[0] > 0.5), None)


def own_best_cells(
    frame: pl.DataFrame, key: Sequence[str], value: str, lower_is_better: bool
) -> pl.DataFrame:
    """Per (key..., eval_lang) cell that holds its own calibration language and another: whether
    own calibration gives the best `value`. `frame`: key columns, calib_lang, eval_lang, value
    (means over seeds are taken here)."""
    means = frame.group_by(*key, "calib_lang", "eval_lang").agg(pl.col(value).mean()).drop_nulls(value)
    rows = []
    for group, part in means.group_by(*key, "eval_lang", maintain_order=True):
        lang = group[-1]
        calibs = part["calib_lang"].to_list()
        if lang not in calibs or len(calibs) < 2:
            continue
        values = dict(zip(calibs, part[value].to_list(), strict=True))
        own = values.pop(lang)
        best_other = min(values.values()) if lower_is_better else max(values.values())
        wins = own < best_other if lower_is_better else own > best_other
        rows.append((*group, len(calibs), own, best_other, wins))
    schema = [*key, "eval_lang", "candidates", "own", "best_other", "own_best"]
    return pl.DataFrame(rows, schema=schema, orient="row")


def bootstrap_mean(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `values` and its 95% percentile-bootstrap interval (units drawn with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    counts = resample_counts(rng, data.size, resamples)
    replicates = counts @ data / data.size
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}g}"


def cells_finding(claim: str, cells: pl.DataFrame, what: str, evidence: str, covers: str) -> Finding:
    """Claims 1 and 2: own calibration best in most (setting, language) cells."""
    if cells.is_empty():
        return Finding(
            claim, "no data", "—", "—", covers, evidence, f"no {what} of own-language calibrations"
        )
    wins, total = int(cells["own_best"].sum()), cells.height
    result, low, high = share_verdict(wins, total)
    needed = wins_needed(total)
    detail = (
        f"decided as reproduced from {needed} of {total} cells"
        if needed is not None
        else f"{total} cells cannot decide it (too few)"
    )
    return Finding(
        claim,
        result,
        f"own best in {wins} of {total} cells ({_percent(wins / total)})",
        f"{_percent(low)}–{_percent(high)}",
        covers,
        evidence,
        detail,
    )


def tasks_finding(
    claim: str, pooled: pl.DataFrame, metric: str, evidence: str, covers: str, why_none: str = ""
) -> Finding:
    """Claim 3 (own-language calibration does not consistently improve tasks), from the pooled
    verdicts of one metric (accuracy or margin) over every setting and informative task family:
    reproduced when one of them is equivalent or worse, contradicted when every one is better,
    else inconclusive."""
    rows = pooled.filter(pl.col("metric") == metric) if not pooled.is_empty() else pooled
    if rows.is_empty():
        why = why_none or "no informative task with own-language runs"
        return Finding(claim, "inconclusive", "—", "—", covers, evidence, why)
    verdicts = rows["verdict"].to_list()
    labels = [f"{r['setting']} {r['task']}: {r['verdict']}" for r in rows.iter_rows(named=True)]
    result = claim_verdict(
        any(v in ("equivalent", "worse") for v in verdicts), all(v == "better" for v in verdicts)
    )
    effects = "; ".join(
        f"{r['setting']} {r['task']} {_signed(r['effect'])}" for r in rows.iter_rows(named=True)
    )
    intervals = "; ".join(f"{r['low']:+.3g}…{r['high']:+.3g}" for r in rows.iter_rows(named=True))
    detectable = "; ".join(
        f"{r['setting']} {r['task']} {r['detectable']:.3g}" for r in rows.iter_rows(named=True)
    )
    return Finding(
        claim,
        result,
        f"{'; '.join(labels)} (own - others: {effects})",
        intervals,
        covers,
        evidence,
        f"smallest detectable effect: {detectable}",
    )


def iou_finding(claim: str, iou: dict[str, pl.DataFrame], evidence: str, covers: str) -> Finding:
    """Claim 4: per analysis (setting), the modules of lowest mean IoU over the first third of the
    layers are o_proj and down_proj, and their IoU lies below the other modules' there (the gap, a
    mean over the early layers, with a bootstrap interval over those layers). Reproduced when both
    hold in every analysis, contradicted when the gap interval lies above 0 in every one."""
    if not iou:
        return Finding(claim, "no data", "—", "—", covers, evidence, "no analysis with mask IoU")
    numbers, intervals, agreed, below, above = [], [], [], [], []
    papers = pl.any_horizontal(pl.col("module").str.ends_with(name) for name in PAPER_LOW_IOU_MODULES)
    for setting, frame in sorted(iou.items()):
        early = frame.filter(pl.col("layer") <= frame["layer"].max() // 3)
        lowest = lowest_overlap_modules(frame)
        per_layer = early.group_by("layer").agg(
            pl.col("iou").filter(papers).mean().alias("paper"),
            pl.col("iou").filter(~papers).mean().alias("rest"),
        )
        gaps = (per_layer["paper"] - per_layer["rest"]).drop_nulls().to_list()
        if not gaps:
            continue
        gap, low, high = bootstrap_mean(gaps)
        agreed.append(paper_agrees(lowest))
        below.append(high < 0)
        above.append(low > 0)
        numbers.append(f"{setting}: lowest {', '.join(lowest)}; o/down - rest {gap:+.4f}")
        intervals.append(f"{low:+.4f}…{high:+.4f}")
    if not numbers:
        return Finding(claim, "no data", "—", "—", covers, evidence, "no early layers")
    result = claim_verdict(all(agreed) and all(below), all(above))
    return Finding(
        claim,
        result,
        "; ".join(numbers),
        "; ".join(intervals),
        covers,
        evidence,
        "interval: bootstrap over the early layers (first third) of the per-layer gap",
    )


def lsar_finding(claim: str, lsar: pl.DataFrame, vary: str, evidence: str, covers: str) -> Finding:
    """Claim 5: per (setting, evaluation language L) with its own calibration: the relative change
    of the mean squared deviation inside the language-specific subspace when calibrating on L
    instead of the others (own / mean(others) - 1), and the same outside it (agnostic), each with a
    bootstrap interval over the cells. Reproduced when the specific change lies below 0 and the
    agnostic one inside +-AGNOSTIC_BAND ("about the same"); contradicted when the specific change
    lies above 0 or the agnostic one beyond the band; else inconclusive."""
    if lsar.is_empty():
        return Finding(
            claim, "no data", "—", "—", covers, evidence, "no LSAR analysis (analyze with activations)"
        )
    means = lsar.group_by("setting", vary, "eval_lang").agg(
        pl.col("specific").mean(), pl.col("agnostic").mean()
    )
    specific, agnostic = [], []
    for (_, lang), part in means.group_by("setting", "eval_lang", maintain_order=True):
        own = part.filter(pl.col(vary) == lang)
        others = part.filter(pl.col(vary) != lang)
        if own.is_empty() or others.is_empty():
            continue
        specific.append(own["specific"][0] / others["specific"].mean() - 1)
        agnostic.append(own["agnostic"][0] / others["agnostic"].mean() - 1)
    if not specific:
        return Finding(
            claim, "no data", "—", "—", covers, evidence, "no language calibrated and evaluated on"
        )
    spec, spec_low, spec_high = bootstrap_mean(specific)
    difference, diff_low, diff_high = bootstrap_mean([s - a for s, a in zip(specific, agnostic, strict=True)])
    agn, agn_low, agn_high = bootstrap_mean(agnostic)
    about_the_same = agn_low > -AGNOSTIC_BAND and agn_high < AGNOSTIC_BAND
    moved = agn_high < -AGNOSTIC_BAND or agn_low > AGNOSTIC_BAND
    result = claim_verdict(spec_high < 0 and about_the_same, spec_low > 0 or moved)
    return Finding(
        claim,
        result,
        f"own vs others, {len(specific)} cells: specific {_percent(spec)}, agnostic {_percent(agn)}, "
        f"specific - agnostic {_percent(difference)}",
        f"specific {_percent(spec_low)}…{_percent(spec_high)}; agnostic {_percent(agn_low)}…"
        f"{_percent(agn_high)}; difference {_percent(diff_low)}…{_percent(diff_high)}",
        covers,
        evidence,
        "bootstrap over (setting, language) cells",
    )


def lape_finding(claim: str, lape: pl.DataFrame, evidence: str, covers: str) -> Finding:
    """Claim 6: the mean change of the activation probability of the dense model's language-specific
    neurons (each in its language) after pruning, over (setting, calibration language, language)
    cells, with a bootstrap interval; reproduced when it excludes 0, else inconclusive (never
    'no change': the detectable change is stated)."""
    if lape.is_empty():
        return Finding(
            claim, "no data", "—", "—", covers, evidence, "no LAPE analysis (analyze with activations)"
        )
    changes = lape["prob_change"].drop_nulls().to_list()  # null: no dense neurons of that language
    if not changes:
        return Finding(
            claim, "no data", "—", "—", covers, evidence, "the dense model has no language-specific neurons"
        )
    mean, low, high = bootstrap_mean(changes)
    overlap = float(lape["overlap"].mean())
    result = claim_verdict(low > 0 or high < 0, False)
    detectable = POWER_Z * (high - low) / (2 * 1.959963984540054)
    return Finding(
        claim,
        result,
        f"activation probability change {mean:+.4f} over {len(changes)} cells; "
        f"neuron-set overlap {overlap:.2f}",
        f"{low:+.4f}…{high:+.4f}",
        covers,
        evidence,
        f"smallest detectable change {detectable:.4f}; bootstrap over cells",
    )
