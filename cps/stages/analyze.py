"""`cps analyze`: analyses across comparison groups of prune runs, logged as `cps.stage=analyze` runs.

A group is a set of prune runs that differ only in the calibration language (or another `vary`
param). For each group: pairwise IoU of the masks (long table, layer x module heatmap, language x
language matrix, and whether the paper's finding holds: the lowest overlap in attention-output and
MLP-down projections of early layers), and the per-layer SNR by calibration language from each
run's `layer_stats.parquet`. (LAPE, LSAR and the cross-language SNR on held-out text are next.)
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
from cps.pruning.masks import load_masks

if TYPE_CHECKING:
    import polars as pl

PAPER_LOW_IOU_MODULES = ("o_proj", "down_proj")  # arXiv 2408.14398: lowest overlap, early layers


@dataclass(frozen=True)
class AnalyzeConfig:
    vary: str = "calib_lang"
    filters: tuple[tuple[str, str], ...] = ()


@dataclass
class GroupAnalysis:
    group: Group
    run_id: str
    iou: pl.DataFrame
    snr: pl.DataFrame
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
    masks = {}
    with tempfile.TemporaryDirectory() as folder:
        for value, run_id in group.members.items():
            path = tracking.download_artifact(store, run_id, "masks.safetensors", f"{folder}/{run_id}")
            masks[value] = load_masks(str(path))
    return pairwise_iou(masks)


def snr_by_member(store: tracking.Store, group: Group, vary: str) -> pl.DataFrame:
    """Every member's layer_stats with a column naming its `vary` value."""
    import polars as pl

    frames = []
    with tempfile.TemporaryDirectory() as folder:
        for value, run_id in group.members.items():
            path = tracking.download_artifact(store, run_id, "layer_stats.parquet", f"{folder}/{run_id}")
            frames.append(pl.read_parquet(path).with_columns(pl.lit(value).alias(vary)))
    return pl.concat(frames)


def lowest_overlap_modules(iou: pl.DataFrame, count: int = 2) -> list[str]:
    """Modules with the lowest mean IoU over the first third of the layers."""
    import polars as pl

    early = iou.filter(pl.col("layer") <= iou["layer"].max() // 3)
    ranked = early.group_by("module").agg(pl.col("iou").mean()).sort("iou", "module")
    return ranked["module"].head(count).to_list()


def analyze_group(store: tracking.Store, group: Group, vary: str) -> GroupAnalysis:
    import polars as pl

    from cps.analysis.plots import iou_heatmap, language_matrix

    iou = mask_overlap(store, group)
    snr = snr_by_member(store, group, vary)
    pairs = iou.group_by("lang_a", "lang_b").agg(pl.col("iou").mean()).sort("lang_a", "lang_b")
    lowest = lowest_overlap_modules(iou)
    agrees = all(any(m.endswith(p) for m in lowest) for p in PAPER_LOW_IOU_MODULES)
    headlines = {"iou.mean": float(iou["iou"].mean())}
    for module, value in iou.group_by("module").agg(pl.col("iou").mean()).iter_rows():
        headlines[f"iou.{module}"] = float(value)
    params = {**group.shared, "vary": vary, "runs": json.dumps(group.members, sort_keys=True)}
    name = f"analyze-{group.shared.get('method')}-{group.shared.get('model')}-by-{vary}"
    with tracking.start_run(store, "analyze", params, name) as run:
        run.log_metrics(headlines)
        run.set_tags({"cps.paper_low_iou_agrees": agrees, "cps.lowest_iou_modules": ",".join(lowest)})
        for frame, artifact in (
            (iou, "iou.parquet"),
            (pairs, "iou_pairs.parquet"),
            (snr, "snr_by_calib.parquet"),
        ):
            run.log_frame(frame, artifact)
        with tempfile.TemporaryDirectory() as folder:
            plots = Path(folder) / "plots"
            plots.mkdir()
            iou_heatmap(iou, f"mask IoU across {vary} — {name}").savefig(plots / "iou_heatmap.png", dpi=110)
            language_matrix(pairs, "iou", f"mean mask IoU by {vary}").savefig(
                plots / "iou_languages.png", dpi=110
            )
            run.log_artifact(plots, "plots")
    return GroupAnalysis(group, run.run_id, iou, snr, headlines, agrees, lowest)


def run_analyze(config: AnalyzeConfig, store: tracking.Store) -> list[GroupAnalysis]:
    tracking.client(store)
    groups = find_groups(store, config.vary, dict(config.filters))
    if not groups:
        where = " ".join(f"{k}={v}" for k, v in config.filters) or "the store"
        raise CpsError(f"no two finished prune runs in {where} differ only in {config.vary}")
    return [analyze_group(store, group, config.vary) for group in groups]
