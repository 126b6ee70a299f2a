"""`cps analyze`: analyses across comparison groups of prune runs, logged as `cps.stage=analyze` runs.

A group is a set of prune runs that differ only in the calibration language (or another
`group_by` param). For each group: load its masks and layer stats, compute (`cps.analysis`), log.
- pairwise mask IoU (long table, layer x module heatmap, language x language matrix, and whether
  the paper's finding holds: the lowest overlap in attention-output and MLP-down projections of
  early layers), and the in-sample per-layer SNR of each member on its own calibration tokens
  (`calib_snr`: not a comparison on common text);
- with `activations`, on held-out text of each language (windowed as `cps eval` windows it,
  statistics at the scored positions, never BOS): LAPE language-specific neurons of the dense model
  against each pruned one, the layer-wise SNR of each pruned model's hidden states against the
  dense ones per evaluation language ("does calibrating on L best preserve L?"), and LSAR: that
  deviation split into the dense model's language-specific subspace and the language-agnostic rest;
- for OWL runs (`allocation=owl`), how the allocated layer sparsities differ across the group
  (`owl_spread`), and for layer-removal runs (tagged `cps.removed_layers`), how the removed layers
  overlap (`removed_layer_overlap`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from cps import tracking
from cps.analysis.cross_language import own_language_best
from cps.analysis.groups import Group, comparison_groups
from cps.analysis.lape import lape, neuron_counts, neuron_overlap
from cps.analysis.layer_plans import owl_headlines, owl_spread, removed_headlines, removed_layer_overlap
from cps.analysis.lsar import language_subspace, split_second_moment
from cps.analysis.masks_overlap import (
    code_headlines,
    iou_headlines,
    language_pairs,
    lowest_overlap_modules,
    pairwise_code_agreement,
    pairwise_iou,
    paper_agrees,
)
from cps.config import DENSE, PROTOCOL_VERSION, AnalyzeConfig, default_stride, quant_label, run_variant
from cps.data import get_corpus
from cps.errors import CpsError
from cps.evaluation.activations import ActivationStats, activation_statistics
from cps.evaluation.hidden import DenseStates, PositionSample, ReferenceKey, reference_plan, save_reference
from cps.evaluation.windows import HeldOutText, held_out_windows
from cps.models import LoadOptions, model_id, resolve_model
from cps.notes import describe
from cps.runs import REMOVED_LAYERS_TAG, load_run_model, run_codes, run_layer_stats, run_masks, run_series
from cps.streaming import load


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
    layer_plan_tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # OWL or removed layers


def find_groups(
    store: tracking.Store, group_by: str = "calib_lang", filters: Mapping[str, str] | None = None
) -> list[Group]:
    """Finished prune runs (not dense baselines) matching `filters`, grouped by all but `group_by`."""
    runs = [
        (record.run_id, record.params)
        for record in tracking.find_runs(store, "prune", dict(filters or {}))
        if record.params.get("method") != DENSE
    ]
    return comparison_groups(runs, group_by)


def analysis_params(group: Group, config: AnalyzeConfig) -> dict[str, object]:
    """The analysis run's params: the group, its members and every setting that shapes the result."""
    params: dict[str, object] = {
        **group.shared,
        "vary": config.group_by,
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
            "max_documents": config.max_docs,
            "lape_ratio": config.lape_ratio,
            "lsar_rank": config.lsar_rank,
        }
    return params


def analyze_group(
    store: tracking.Store, group: Group, config: AnalyzeConfig, tags: Mapping[str, str] | None = None
) -> GroupAnalysis:
    vary = config.group_by
    masks = {value: run_masks(store, run_id) for value, run_id in group.members.items()}
    pruned = any(bool(mask.any()) for member in masks.values() for mask in member.values())
    iou = pairwise_iou(masks if pruned else {})  # a quantization method prunes nothing
    del masks
    codes = None
    if quant_label(group.shared) is not None:  # quantized: which integer codes the languages share
        codes = pairwise_code_agreement(
            {value: run_codes(store, run_id) for value, run_id in group.members.items()}
        )
    calib_snr = pl.concat(
        [
            run_layer_stats(store, run_id).with_columns(pl.lit(value).alias(vary))
            for value, run_id in group.members.items()
        ]
    )
    tables = activation_analyses(store, group, config) if config.activations else {}
    plans, plan_headlines = layer_plan_analyses(store, group)
    lowest = lowest_overlap_modules(iou) if pruned else []
    agrees = paper_agrees(lowest) if pruned else None
    headlines = (iou_headlines(iou) if pruned else {}) | plan_headlines
    if codes is not None:
        headlines |= code_headlines(codes)
    if tables:
        headlines |= {
            "lape.overlap.mean": float(tables["lape_overlap"]["overlap"].mean()),
            "lsar.specific_share.mean": float(tables["lsar"]["specific_share"].mean()),
            "cross_snr.own_lang_best": own_language_best(tables["cross_snr"], vary),
        }
    shared = group.shared
    method = run_variant(shared)
    name = f"analyze-{method}-{shared.get('model')}-by-{vary}"
    frames = {"iou": iou, "iou_pairs": language_pairs(iou), "calib_snr": calib_snr, **tables, **plans}
    if codes is not None:
        frames["code_agreement"] = codes
    with tracking.start_run(store, "analyze", analysis_params(group, config), name, tags) as run:
        run.log_metrics(headlines)
        describe(store, run.run_id)
        if pruned:
            run.set_tags({"cps.paper_low_iou_agrees": agrees, "cps.lowest_iou_modules": ",".join(lowest)})
        run.log_frames({f"{artifact}.parquet": frame for artifact, frame in frames.items()})
        from cps.analysis.plots import group_figures, layer_plan_figures  # matplotlib: only to draw

        uniform = float(group.shared["sparsity"]) if "sparsity" in group.shared else None
        figures = group_figures(frames, vary, name) | layer_plan_figures(frames, vary, name, uniform)
        with tempfile.TemporaryDirectory() as folder:
            plots = Path(folder) / "plots"
            plots.mkdir()
            for artifact, figure in figures.items():
                figure.savefig(plots / f"{artifact}.png", dpi=110)
            run.log_artifact(plots, "plots")
    return GroupAnalysis(group, run.run_id, iou, calib_snr, tables, headlines, agrees, lowest, plans)


OWL_TARGETS = "owl.sparsity_target.layer"  # the sparsity OWL allocated to each decoder layer
OWL_RATIOS = "owl.outlier_ratio.layer"  # D_l, the layer's outlier ratio (percent)
BLOCK_INFLUENCE = "block_influence.layer"  # a layer-removal run's score of every decoder layer


def layer_plan_analyses(
    store: tracking.Store, group: Group
) -> tuple[dict[str, pl.DataFrame], dict[str, float]]:
    """How the members' layer plans differ: OWL's allocations (`allocation=owl`, shared by the
    group) or the removed layers (every member tagged `cps.removed_layers`); tables and headlines,
    none for other groups."""
    members = group.members
    if group.shared.get("allocation") == "owl":
        spread = owl_spread(
            {value: run_series(store, run_id, OWL_TARGETS) for value, run_id in members.items()},
            {value: run_series(store, run_id, OWL_RATIOS) for value, run_id in members.items()},
        )
        lam = float(group.shared["owl_lambda"]) if "owl_lambda" in group.shared else None
        tables = {
            "owl_layers": spread.layers,
            "owl_spread": spread.summary,
            "owl_rank_pairs": spread.rank_pairs,
        }
        return tables, owl_headlines(spread, lam)
    tags = {value: tracking.get_run(store, run_id).tags for value, run_id in members.items()}
    if not all(REMOVED_LAYERS_TAG in member_tags for member_tags in tags.values()):
        return {}, {}
    layers = len(run_series(store, next(iter(members.values())), BLOCK_INFLUENCE))
    removed = {value: json.loads(member_tags[REMOVED_LAYERS_TAG]) for value, member_tags in tags.items()}
    overlap = removed_layer_overlap(removed, layers)
    tables = {
        "removed_layers": overlap.grid,
        "removed_layer_counts": overlap.layers,
        "removed_layer_pairs": overlap.pairs,
    }
    return tables, removed_headlines(overlap)


def run_analyze(config: AnalyzeConfig, store: tracking.Store) -> list[GroupAnalysis]:
    tracking.client(store)
    groups = find_groups(store, config.group_by, dict(config.filters))
    if not groups:
        where = " ".join(f"{k}={v}" for k, v in config.filters) or "the store"
        raise CpsError(f"no two finished prune runs in {where} differ only in {config.group_by}")
    return [analyze_group(store, group, config) for group in groups]


def activation_analyses(
    store: tracking.Store, group: Group, config: AnalyzeConfig
) -> dict[str, pl.DataFrame]:
    """LAPE overlap, cross-language SNR and the LSAR split for every member against the dense model.

    Each model runs once per language: firing counts, hidden means and the deviation from the dense
    states (recorded in the dense model's own pass, cached on disk)."""
    corpus = get_corpus(config.corpus, config.data_dir)
    langs = [corpus.require(lang) for lang in config.langs]
    options = LoadOptions(group.shared.get("dtype", "auto"), config.device)
    dense = load(group.shared["model"], options)  # streamed when it would not fit
    texts = {
        lang: held_out_windows(
            corpus.documents(lang)[: config.max_docs], dense.tokenizer, config.seqlen, config.stride
        )
        for lang in langs
    }
    model_key = group.shared.get("model_id") or model_id(resolve_model(group.shared["model"]))
    plans = {lang: reference_plan(dense.model, model_key, text) for lang, text in texts.items()}
    dense_stats = _dense_statistics(dense.model, texts, plans)
    dense_probs = _probabilities(dense_stats, langs)
    dense_neurons = lape(dense_probs, langs, config.lape_ratio)
    subspaces = [
        language_subspace(torch.stack([dense_stats[lang].hidden_mean[i] for lang in langs]), config.lsar_rank)
        for i in range(dense_probs.shape[0])
    ]
    states = DenseStates(lambda: dense.model)
    tables: dict[str, list[pl.DataFrame]] = {"lape_overlap": [], "cross_snr": [], "lsar": []}
    tables["lape_counts"] = [neuron_counts("dense", dense_neurons, langs)]
    for value, run_id in group.members.items():
        pruned = load_run_model(store, tracking.get_run(store, run_id), options)
        member = {config.group_by: value}
        pruned_stats = {}
        for lang, text in texts.items():
            key, sample = plans[lang]
            pruned_stats[lang], deviation, _ = activation_statistics(
                pruned.model, text, reference=(sample, states.get(key, sample, text))
            )
            assert deviation is not None
            labels = {**member, "eval_lang": lang}
            snr = pl.DataFrame({"layer": range(len(deviation.snr_db)), "snr_db": deviation.snr_db.tolist()})
            tables["cross_snr"].append(_labelled(snr, labels))
            split = split_second_moment(deviation.second_moment, deviation.noise, deviation.tokens, subspaces)
            tables["lsar"].append(_labelled(split, labels))
        pruned_probs = _probabilities(pruned_stats, langs)
        pruned_neurons = lape(pruned_probs, langs, config.lape_ratio)
        tables["lape_counts"].append(neuron_counts(value, pruned_neurons, langs))
        overlap = neuron_overlap(dense_neurons, pruned_neurons, dense_probs, pruned_probs, langs)
        tables["lape_overlap"].append(_labelled(overlap, member))
        summaries = {
            f"lape.overlap.{lang}": score for lang, score in overlap.select("lang", "overlap").iter_rows()
        }
        tracking.open_run(store, run_id).log_metrics(summaries)
    return {name: pl.concat(frames) for name, frames in tables.items()}


def _dense_statistics(
    model: torch.nn.Module,
    texts: Mapping[str, HeldOutText],
    plans: Mapping[str, tuple[ReferenceKey, PositionSample]],
) -> dict[str, ActivationStats]:
    """The dense model's statistics per language; its hidden states recorded in the same pass
    (for the deviations of the pruned models) unless the cache holds them."""
    stats = {}
    for lang, text in texts.items():
        key, sample = plans[lang]
        record = None if key.path.is_file() else sample
        stats[lang], _, recorded = activation_statistics(model, text, record=record)
        if recorded is not None:
            save_reference(key, recorded)
    return stats


def _probabilities(stats: Mapping[str, ActivationStats], langs: list[str]) -> torch.Tensor:
    """(layers, neurons, languages) activation probabilities."""
    return torch.stack([stats[lang].probabilities for lang in langs], -1)


def _labelled(frame: pl.DataFrame, labels: Mapping[str, str]) -> pl.DataFrame:
    """`frame` with constant label columns in front."""
    return frame.select(*[pl.lit(value).alias(name) for name, value in labels.items()], pl.all())
