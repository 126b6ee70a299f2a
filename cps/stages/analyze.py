"""Analyses across runs of the tracking store (issue 5, in progress): comparison groups and mask IoU.

Done so far: finding the groups of prune runs that differ only in the calibration language, and
the pairwise IoU of their masks. LAPE, LSAR and the cross-language SNR views, and the `cps analyze`
command that logs them as an analysis run, come next.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cps import tracking
from cps.analysis.groups import Group, comparison_groups
from cps.analysis.masks_overlap import pairwise_iou
from cps.pruning.masks import load_masks

if TYPE_CHECKING:
    import polars as pl


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
