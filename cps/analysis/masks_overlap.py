"""Mask overlap across calibration languages (arXiv 2408.14398, Sec. 5): IoU of pruned-weight sets;
for quantized runs, the share of weights given the same integer code (`code_agreement`)."""

from __future__ import annotations

import re
from itertools import combinations

import polars as pl
import torch

_LAYER = re.compile(r"\.(\d+)\.(.+)$")


def split_module_name(name: str) -> tuple[int, str]:
    """'model.layers.3.mlp.down_proj' -> (3, 'mlp.down_proj')."""
    match = _LAYER.search(name)
    if not match:
        raise ValueError(f"no layer index in module name {name!r}")
    return int(match[1]), match[2]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A & B| / |A | B| of two pruned sets (bool masks, True = pruned); 1.0 when both are empty."""
    union = torch.logical_or(a, b).sum().item()
    return 1.0 if union == 0 else torch.logical_and(a, b).sum().item() / union


def pairwise_iou(masks: dict[str, dict[str, torch.Tensor]]) -> pl.DataFrame:
    """Long table (layer, module, lang_a, lang_b, iou) for every pair of calibration languages."""
    rows = []
    for lang_a, lang_b in combinations(sorted(masks), 2):
        for name in sorted(masks[lang_a].keys() & masks[lang_b].keys()):
            layer, module = split_module_name(name)
            rows.append((layer, module, lang_a, lang_b, mask_iou(masks[lang_a][name], masks[lang_b][name])))
    schema = {
        "layer": pl.Int64,
        "module": pl.String,
        "lang_a": pl.String,
        "lang_b": pl.String,
        "iou": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def pairwise_code_agreement(codes: dict[str, dict[str, torch.Tensor]]) -> pl.DataFrame:
    """Long table (layer, module, lang_a, lang_b, agreement): per pair of calibration languages
    and linear, the share of its weights whose integer codes are equal (on each run's own grid; a
    pruned weight's code is its zero point). RTN, which reads no calibration, gives 1 everywhere."""
    rows = []
    for lang_a, lang_b in combinations(sorted(codes), 2):
        for name in sorted(codes[lang_a].keys() & codes[lang_b].keys()):
            layer, module = split_module_name(name)
            a, b = codes[lang_a][name], codes[lang_b][name]
            rows.append((layer, module, lang_a, lang_b, torch.eq(a, b).float().mean().item()))
    schema = {
        "layer": pl.Int64,
        "module": pl.String,
        "lang_a": pl.String,
        "lang_b": pl.String,
        "agreement": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def code_headlines(agreement: pl.DataFrame) -> dict[str, float]:
    """`code_agreement.mean` over every pair and linear; `.min`, and per module the mean."""
    if agreement.is_empty():
        return {}
    values = {
        "code_agreement.mean": float(agreement["agreement"].mean()),
        "code_agreement.min": float(agreement["agreement"].min()),
    }
    per_module = agreement.group_by("module").agg(pl.col("agreement").mean()).sort("module")
    for module, value in per_module.iter_rows():
        values[f"code_agreement.{module}"] = float(value)
    return values


PAPER_LOW_IOU_MODULES = ("o_proj", "down_proj")  # arXiv 2408.14398: lowest overlap, early layers


def lowest_overlap_modules(iou: pl.DataFrame, count: int = 2) -> list[str]:
    """Modules with the lowest mean IoU over the first third of the layers."""
    early = iou.filter(pl.col("layer") <= iou["layer"].max() // 3)
    ranked = early.group_by("module").agg(pl.col("iou").mean()).sort("iou", "module")
    return ranked["module"].head(count).to_list()


def paper_agrees(lowest: list[str]) -> bool:
    """Whether the lowest-overlap modules are the paper's: attention output and MLP down projection."""
    return all(any(module.endswith(name) for module in lowest) for name in PAPER_LOW_IOU_MODULES)


def iou_headlines(iou: pl.DataFrame) -> dict[str, float]:
    """iou.mean and iou.<module> (mean over layers and language pairs)."""
    headlines = {"iou.mean": float(iou["iou"].mean())}
    for module, value in iou.group_by("module").agg(pl.col("iou").mean()).iter_rows():
        headlines[f"iou.{module}"] = float(value)
    return headlines


def language_pairs(iou: pl.DataFrame) -> pl.DataFrame:
    """(lang_a, lang_b, iou): the mean over layers and modules of every language pair."""
    return iou.group_by("lang_a", "lang_b").agg(pl.col("iou").mean()).sort("lang_a", "lang_b")
