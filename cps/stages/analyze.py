"""`cps analyze`: analyses across comparison groups of prune runs, logged as `cps.stage=analyze` runs.

A group is a set of prune runs that differ only in the calibration language (or another `vary`
param). For each group: pairwise IoU of the masks (long table, layer x module heatmap, language x
language matrix, and whether the paper's finding holds: the lowest overlap in attention-output and
MLP-down projections of early layers), and the in-sample per-layer SNR by calibration language
from each run's `layer_stats.parquet` (`calib_snr`: every run measured on its own calibration
tokens, so not a comparison on common text). With `activations`, on held-out text of each language
(windowed as `cps eval` does, statistics at the scored positions, never BOS): LAPE
language-specific neurons of the dense model against each pruned one, the layer-wise SNR of each
pruned model's hidden states against the dense ones per evaluation language ("does calibrating on
L best preserve L?"), and LSAR: that deviation split into the dense model's language-specific
subspace and the language-agnostic rest.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cps import tracking
from cps.analysis.groups import Group, comparison_groups
from cps.analysis.masks_overlap import pairwise_iou
from cps.errors import CpsError
from cps.evaluation.windows import PROTOCOL_VERSION, default_stride

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

    from cps.analysis.lape import LanguageNeurons

PAPER_LOW_IOU_MODULES = ("o_proj", "down_proj")  # arXiv 2408.14398: lowest overlap, early layers


@dataclass(frozen=True)
class AnalyzeConfig:
    vary: str = "calib_lang"
    filters: tuple[tuple[str, str], ...] = ()
    activations: bool = False  # LAPE, LSAR and cross-language SNR on held-out text
    langs: tuple[str, ...] = ("ar", "de", "en", "es", "ru", "sw", "zh")
    corpus: str = "flores"
    seqlen: int = 512  # tokens per held-out window, BOS included (as cps eval)
    stride: int | None = None  # window step inside a long document (default seqlen // 2)
    max_documents: int | None = None  # per language, for quick runs
    lape_ratio: float = 0.01
    lsar_rank: int | None = None  # default: languages - 1
    device: str = "cpu"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.activations and len(self.langs) < 2:
            raise CpsError("activation analyses compare languages: give at least two --langs")
        if self.stride is not None and not 1 <= self.stride < self.seqlen:
            raise CpsError(f"--stride must be between 1 and --seqlen - 1 (got {self.stride})")
        if not 0 < self.lape_ratio < 1:
            raise CpsError(f"--lape-ratio must be in (0, 1) (got {self.lape_ratio:g})")


@dataclass
class GroupAnalysis:
    group: Group
    run_id: str
    iou: pl.DataFrame
    calib_snr: pl.DataFrame  # in-sample, per member on its own calibration tokens
    activation_tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    headlines: dict[str, float] = field(default_factory=dict)
    paper_agrees: bool | None = None
    lowest_modules: list[str] = field(default_factory=list)


def find_groups(
    store: tracking.Store, vary: str = "calib_lang", filters: Mapping[str, str] | None = None
) -> list[Group]:
    """Finished prune runs (not dense baselines) matching `filters`, grouped by all but `vary`."""
    runs = [
        (record.run_id, record.params)
        for record in tracking.find_runs(store, "prune", dict(filters or {}))
        if record.params.get("method") != "dense"
    ]
    return comparison_groups(runs, vary)


def mask_overlap(store: tracking.Store, group: Group) -> pl.DataFrame:
    """Pairwise IoU (layer, module, lang_a, lang_b, iou) of the group's saved masks."""
    from cps.stages.evaluate import run_masks

    return pairwise_iou({value: run_masks(store, run_id) for value, run_id in group.members.items()})


# layer_stats.parquet columns before the in-sample figures were named for what they are
_LEGACY_LAYER_STATS = {"error": "calib_error", "signal": "calib_signal", "snr_db": "calib_snr_db"}


def calib_snr_by_member(store: tracking.Store, group: Group, vary: str) -> pl.DataFrame:
    """Every member's layer_stats (in-sample: each run on its own calibration tokens) with a column
    naming its `vary` value."""
    import polars as pl

    frames = []
    with tempfile.TemporaryDirectory() as folder:
        for value, run_id in group.members.items():
            path = tracking.download_artifact(store, run_id, "layer_stats.parquet", f"{folder}/{run_id}")
            stats = pl.read_parquet(path)
            stats = stats.rename({k: v for k, v in _LEGACY_LAYER_STATS.items() if k in stats.columns})
            frames.append(stats.with_columns(pl.lit(value).alias(vary)))
    return pl.concat(frames)


def lowest_overlap_modules(iou: pl.DataFrame, count: int = 2) -> list[str]:
    """Modules with the lowest mean IoU over the first third of the layers."""
    import polars as pl

    early = iou.filter(pl.col("layer") <= iou["layer"].max() // 3)
    ranked = early.group_by("module").agg(pl.col("iou").mean()).sort("iou", "module")
    return ranked["module"].head(count).to_list()


def analysis_params(group: Group, config: AnalyzeConfig) -> dict[str, object]:
    """The analysis run's params: the group, its members and every setting that shapes the result."""
    params: dict[str, object] = {
        **group.shared,
        "vary": config.vary,
        "runs": json.dumps(group.members, sort_keys=True),
        "activations": config.activations,
    }
    if config.activations:
        params |= {
            "eval_langs": ",".join(config.langs),
            "eval_corpus": config.corpus,
            "eval_seqlen": config.seqlen,
            "eval_stride": config.stride or default_stride(config.seqlen),
            "eval_protocol": PROTOCOL_VERSION,
            "max_documents": config.max_documents,
            "lape_ratio": config.lape_ratio,
            "lsar_rank": config.lsar_rank,
        }
    return params


def analyze_group(
    store: tracking.Store, group: Group, config: AnalyzeConfig, tags: Mapping[str, str] | None = None
) -> GroupAnalysis:
    import polars as pl

    vary = config.vary
    iou = mask_overlap(store, group)
    snr = calib_snr_by_member(store, group, vary)
    tables = activation_analyses(store, group, config) if config.activations else {}
    pairs = iou.group_by("lang_a", "lang_b").agg(pl.col("iou").mean()).sort("lang_a", "lang_b")
    lowest = lowest_overlap_modules(iou)
    agrees = all(any(m.endswith(p) for m in lowest) for p in PAPER_LOW_IOU_MODULES)
    headlines = {"iou.mean": float(iou["iou"].mean())}
    for module, value in iou.group_by("module").agg(pl.col("iou").mean()).iter_rows():
        headlines[f"iou.{module}"] = float(value)
    if tables:
        headlines.update(activation_headlines(tables, vary))
    params = analysis_params(group, config)
    name = f"analyze-{group.shared.get('method')}-{group.shared.get('model')}-by-{vary}"
    frames = {"iou": iou, "iou_pairs": pairs, "calib_snr": snr, **tables}
    with tracking.start_run(store, "analyze", params, name, tags) as run:
        run.log_metrics(headlines)
        run.set_tags({"cps.paper_low_iou_agrees": agrees, "cps.lowest_iou_modules": ",".join(lowest)})
        for artifact, frame in frames.items():
            run.log_frame(frame, f"{artifact}.parquet")
        with tempfile.TemporaryDirectory() as folder:
            plots = Path(folder) / "plots"
            plots.mkdir()
            for artifact, figure in group_figures(frames, vary, name).items():
                figure.savefig(plots / f"{artifact}.png", dpi=110)
            run.log_artifact(plots, "plots")
    return GroupAnalysis(group, run.run_id, iou, snr, tables, headlines, agrees, lowest)


def group_figures(frames: Mapping[str, pl.DataFrame], vary: str, name: str) -> dict[str, Figure]:
    """The analysis run's plots, from whichever tables it has."""
    import polars as pl

    from cps.analysis.plots import iou_heatmap, language_matrix, layer_lines, matrix_heatmap

    figures = {
        "iou_heatmap": iou_heatmap(frames["iou"], f"mask IoU across {vary} — {name}"),
        "iou_languages": language_matrix(frames["iou_pairs"], "iou", f"mean mask IoU by {vary}"),
        "calib_snr_by_calib": layer_lines(
            frames["calib_snr"],
            "calib_snr_db",
            vary,
            f"in-sample pruning SNR per layer by {vary} (each run on its own calibration tokens)",
            "mean SNR on the calibration tokens (dB)",
        ),
    }
    if "cross_snr" in frames:
        cross = frames["cross_snr"]
        figures["cross_snr"] = matrix_heatmap(
            cross, vary, "eval_lang", "snr_db", "hidden-state SNR vs dense, mean over layers (dB)"
        )
        for lang in sorted(cross["eval_lang"].unique()):
            figures[f"cross_snr_layers_{lang}"] = layer_lines(
                cross.filter(pl.col("eval_lang") == lang),
                "snr_db",
                vary,
                f"hidden-state SNR vs dense on {lang} held-out text",
                "SNR (dB)",
            )
        counts = frames["lape_counts"]
        for model in counts["model"].unique().sort():
            figures[f"lape_counts_{model}"] = layer_lines(
                counts.filter(pl.col("model") == model),
                "neurons",
                "lang",
                f"language-specific neurons (LAPE) per layer — {model}",
                "neurons",
            )
        figures["lape_overlap"] = matrix_heatmap(
            frames["lape_overlap"], vary, "lang", "overlap", "LAPE neuron overlap with the dense model"
        )
        figures["lsar_specific_share"] = layer_lines(
            frames["lsar"],
            "specific_share",
            vary,
            "share of the hidden-state deviation in the language-specific subspace (LSAR)",
            "specific / total deviation",
        )
    return figures


def activation_headlines(tables: Mapping[str, pl.DataFrame], vary: str) -> dict[str, float]:
    """Mean LAPE overlap, LSAR specific share, and how often calibrating on L best preserves L."""
    import polars as pl

    cross = tables["cross_snr"].group_by(vary, "eval_lang").agg(pl.col("snr_db").mean())
    best = cross.sort("snr_db", descending=True).group_by("eval_lang").first()
    evaluated = best.filter(pl.col("eval_lang").is_in(cross[vary].unique().to_list()))
    own = (evaluated[vary] == evaluated["eval_lang"]).mean() if evaluated.height else float("nan")
    return {
        "lape.overlap.mean": float(tables["lape_overlap"]["overlap"].mean()),
        "lsar.specific_share.mean": float(tables["lsar"]["specific_share"].mean()),
        "cross_snr.own_lang_best": float(own),
    }


def run_analyze(config: AnalyzeConfig, store: tracking.Store) -> list[GroupAnalysis]:
    tracking.client(store)
    groups = find_groups(store, config.vary, dict(config.filters))
    if not groups:
        where = " ".join(f"{k}={v}" for k, v in config.filters) or "the store"
        raise CpsError(f"no two finished prune runs in {where} differ only in {config.vary}")
    return [analyze_group(store, group, config) for group in groups]


def activation_analyses(
    store: tracking.Store, group: Group, config: AnalyzeConfig
) -> dict[str, pl.DataFrame]:
    """LAPE overlap, cross-language SNR and the LSAR split for every member against the dense model.

    Held-out text is windowed as for perplexity (each document alone, BOS first) and every statistic
    is taken at the scored positions (never BOS). Each model runs once per language: firing counts,
    hidden means and the deviation from the dense states (recorded in the dense pass, cached on disk).
    """
    import polars as pl
    import torch

    from cps.analysis.lape import lape
    from cps.analysis.lsar import language_subspace
    from cps.data import get_corpus
    from cps.evaluation.activations import activation_statistics
    from cps.evaluation.hidden import DenseStates, reference_plan, save_reference
    from cps.evaluation.windows import held_out_windows
    from cps.models import LoadOptions, load_model, model_id, resolve_model
    from cps.stages.evaluate import load_run_model

    corpus = get_corpus(config.corpus, config.data_dir)
    langs = [corpus.require(lang) for lang in config.langs]
    options = LoadOptions(group.shared.get("dtype", "auto"), config.device)
    dense = load_model(group.shared["model"], options)
    texts = {
        lang: held_out_windows(
            corpus.documents(lang)[: config.max_documents], dense.tokenizer, config.seqlen, config.stride
        )
        for lang in langs
    }
    model_key = group.shared.get("model_id") or model_id(resolve_model(group.shared["model"]))
    plans = {lang: reference_plan(dense.model, model_key, text) for lang, text in texts.items()}
    dense_stats = {}
    for lang, text in texts.items():
        key, sample = plans[lang]
        record = None if key.path.is_file() else sample
        dense_stats[lang], _, recorded = activation_statistics(dense.model, text, record=record)
        if recorded is not None:
            save_reference(key, recorded)
    states = DenseStates(lambda: dense.model)
    dense_probs = torch.stack([dense_stats[lang].probabilities for lang in langs], -1)
    dense_neurons = lape(dense_probs, langs, config.lape_ratio)
    layers = dense_probs.shape[0]
    subspaces = [
        language_subspace(torch.stack([dense_stats[lang].hidden_mean[i] for lang in langs]), config.lsar_rank)
        for i in range(layers)
    ]
    lape_rows, snr_rows, lsar_rows = [], [], []
    count_rows = neuron_counts("dense", dense_neurons, langs)
    for value, run_id in group.members.items():
        pruned = load_run_model(store, tracking.get_run(store, run_id), options)
        probabilities = []
        for lang, text in texts.items():
            key, sample = plans[lang]
            stats, deviation, _ = activation_statistics(
                pruned.model, text, reference=(sample, states.get(key, sample, text))
            )
            assert deviation is not None
            probabilities.append(stats.probabilities)
            for layer in range(layers):
                basis = subspaces[layer].basis.double()
                specific = (
                    torch.trace(basis.T @ deviation.second_moment[layer] @ basis).item() / deviation.tokens
                )
                total = deviation.noise[layer].item() / deviation.tokens
                snr_rows.append((value, lang, layer, deviation.snr_db[layer].item()))
                lsar_rows.append((value, lang, layer, specific, total - specific))
        pruned_probs = torch.stack(probabilities, -1)
        pruned_neurons = lape(pruned_probs, langs, config.lape_ratio)
        count_rows += neuron_counts(value, pruned_neurons, langs)
        summaries = {}
        for index, lang in enumerate(langs):
            before = {tuple(x) for x in dense_neurons.assignment[lang].tolist()}
            after = {tuple(x) for x in pruned_neurons.assignment[lang].tolist()}
            overlap = len(before & after) / len(before | after) if before | after else 1.0
            where = dense_neurons.assignment[lang]
            change = (
                (pruned_probs - dense_probs)[where[:, 0], where[:, 1], index].mean().item()
                if len(where)
                else 0.0
            )
            lape_rows.append((value, lang, len(before), len(after), overlap, change))
            summaries[f"lape.overlap.{lang}"] = overlap
        tracking.open_run(store, run_id).log_metrics(summaries)
    vary = config.vary
    return {
        "lape_overlap": pl.DataFrame(
            lape_rows,
            schema=[vary, "lang", "dense_neurons", "pruned_neurons", "overlap", "prob_change"],
            orient="row",
        ),
        "lape_counts": pl.DataFrame(count_rows, schema=["model", "lang", "layer", "neurons"], orient="row"),
        "cross_snr": pl.DataFrame(snr_rows, schema=[vary, "eval_lang", "layer", "snr_db"], orient="row"),
        "lsar": pl.DataFrame(
            lsar_rows, schema=[vary, "eval_lang", "layer", "specific", "agnostic"], orient="row"
        ).with_columns(
            (pl.col("specific") / (pl.col("specific") + pl.col("agnostic")).clip(lower_bound=1e-30)).alias(
                "specific_share"
            )
        ),
    }


def neuron_counts(model: str, neurons: LanguageNeurons, langs: list[str]) -> list[tuple[str, str, int, int]]:
    """(model, lang, layer, count) of the language-specific neurons of each layer that has any."""
    import torch

    rows = []
    for lang in langs:
        layers, counts = torch.unique(neurons.assignment[lang][:, 0], return_counts=True)
        rows += [(model, lang, int(layer), int(n)) for layer, n in zip(layers, counts, strict=True)]
    return rows
