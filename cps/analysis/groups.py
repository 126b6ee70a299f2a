"""Comparison groups: runs that differ only in one param (by default the calibration language).

Two derived params join every key: `calib_kind` (a single language, or a recipe or mixture such as
`sw+en`: those are compared among themselves, never counted as one more language) and, for runs
logged before allocations and refinements existed, `allocation=uniform` and `refine=none` (what
they were), so that old and new runs of one setting form one group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cps.languages import LANGUAGES

# Params that never define a run's identity (provenance, content hashes that follow calib_lang).
IGNORED = frozenset({"cps_version", "git_sha", "calib_hash"})


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]  # the shared params
    members: dict[str, str] = field(default_factory=dict)  # varied value -> run id

    @property
    def shared(self) -> dict[str, str]:
        return dict(self.key)


def comparison_groups(
    runs: list[tuple[str, Mapping[str, str]]], vary: str = "calib_lang", min_size: int = 2
) -> list[Group]:
    """Group (run_id, params) pairs, newest first, by every param except `vary` and provenance.

    Within a group each value of `vary` keeps its newest run; groups smaller than `min_size` go.
    """
    groups: dict[tuple, Group] = {}
    for run_id, given in runs:
        if vary not in given:
            continue
        params = identity_params(given)
        key = tuple(sorted((k, v) for k, v in params.items() if k != vary and k not in IGNORED))
        group = groups.setdefault(key, Group(key))
        group.members.setdefault(params[vary], run_id)
    return [group for group in groups.values() if len(group.members) >= min_size]


def calib_kind(calib_lang: str | None) -> str:
    """`language` for one language's calibration, `recipe` for a recipe or mixture, `none` (dense)."""
    if calib_lang in (None, "", "none"):
        return "none"
    return "language" if calib_lang in LANGUAGES else "recipe"


def identity_params(params: Mapping[str, str]) -> dict[str, str]:
    """A run's params with the derived ones above filled in."""
    filled = dict(params)
    if filled.get("method", "dense") != "dense":
        filled.setdefault("allocation", "uniform")
        filled.setdefault("refine", "none")
    filled["calib_kind"] = calib_kind(filled.get("calib_lang"))
    return filled
