"""Comparison groups: runs that differ only in one param (by default the calibration language)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
    for run_id, params in runs:
        if vary not in params:
            continue
        key = tuple(sorted((k, v) for k, v in params.items() if k != vary and k not in IGNORED))
        group = groups.setdefault(key, Group(key))
        group.members.setdefault(params[vary], run_id)
    return [group for group in groups.values() if len(group.members) >= min_size]
