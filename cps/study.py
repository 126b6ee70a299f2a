"""Study files: a grid of prune cells plus what to evaluate and analyse, read from TOML.

    [study]        name, description
    [grid]         models, methods, patterns, sparsities, calib_langs, seeds, dense_baseline
    [calibration]  corpus, nsamples, seqlen
    [prune]        dtype, device, save_model, true_sequential, blocksize, dampening
    [eval]         langs, tasks, corpus, seqlen, stride, max_docs, limit, task_limits (a table), batch_size
    [analyze]      group_by, activations, langs, corpus, seqlen, stride, max_docs, lape_ratio, lsar_rank

A cell is one (model, method, pattern/sparsity, calibration language, seed): one prune run that is
also evaluated before it ends. `unstructured` takes every sparsity of the grid; an N:M pattern is
one cell (its sparsity is 1 - N/M). With `dense_baseline` each model also gets a `method=dense` cell.
Every value is checked when the file is read, so a typo fails before any work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cps.data.calibration import CalibrationConfig
from cps.errors import CpsError
from cps.languages import PAPER_LANGUAGES, parse_languages
from cps.pruning.base import MethodOptions
from cps.pruning.engine import EngineConfig
from cps.pruning.masks import SparsityTarget
from cps.stages.analyze import AnalyzeConfig
from cps.stages.evaluate import EvalConfig
from cps.stages.prune import DENSE, PruneConfig, run_identity


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...] = ("gemma3-270m",)
    methods: tuple[str, ...] = ("wanda", "sparsegpt")
    patterns: tuple[str, ...] = ("unstructured",)
    sparsities: tuple[float, ...] = (0.5,)
    calib_langs: tuple[str, ...] = PAPER_LANGUAGES
    seeds: tuple[int, ...] = (0,)
    dense_baseline: bool = True


@dataclass(frozen=True)
class CalibrationSection:
    corpus: str = "ntrex"
    nsamples: int = 128
    seqlen: int = 2048


@dataclass(frozen=True)
class PruneSection:
    dtype: str = "auto"
    device: str = "auto"
    save_model: bool = False
    true_sequential: bool = False
    blocksize: int = 128
    dampening: float = 0.01


@dataclass(frozen=True)
class EvalSection:
    langs: tuple[str, ...] = PAPER_LANGUAGES
    tasks: tuple[str, ...] = ()
    corpus: str = "flores"
    seqlen: int = 1024
    stride: int | None = None
    max_docs: int | None = None
    limit: float | None = None
    task_limits: tuple[tuple[str, float], ...] = ()  # [eval.task_limits] family = items
    batch_size: int = 8


@dataclass(frozen=True)
class AnalyzeSection:
    group_by: tuple[str, ...] = ("calib_lang",)
    activations: bool = False
    langs: tuple[str, ...] = PAPER_LANGUAGES
    corpus: str = "flores"
    seqlen: int = 512
    stride: int | None = None
    max_docs: int | None = None
    lape_ratio: float = 0.01
    lsar_rank: int | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Cell:
    """One prune run of the grid (evaluated inside it)."""

    prune: PruneConfig
    evaluate: EvalConfig  # run_id is filled in when the run exists

    @property
    def key(self) -> dict[str, str]:
        """The params that identify this cell's finished run in the store (as MLflow keeps them)."""
        return {name: str(value) for name, value in run_identity(self.prune).items()}

    @property
    def label(self) -> str:
        key = self.key
        if key["method"] == DENSE:
            return f"{key['model']} dense"
        sparsity = key["pattern"] if key["pattern"] != "unstructured" else f"{float(key['sparsity']):.0%}"
        return f"{key['model']} {key['method']} {sparsity} calib={key['calib_lang']} seed={key['seed']}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    grid: Grid
    calibration: CalibrationSection
    prune: PruneSection
    evaluate: EvalSection
    analyze: AnalyzeSection
    source: str = ""  # the file's text, logged with the sweep
    cells: tuple[Cell, ...] = field(default=(), repr=False)

    @property
    def fingerprint(self) -> str:
        """Identifies the grid and settings (not the name or comments): the sweep's parent run."""
        cells = [cell.key for cell in self.cells]
        payload = json.dumps(
            {"cells": cells, "eval": repr(self.evaluate), "analyze": repr(self.analyze)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def analyze_configs(self, data_dir: str | None) -> list[AnalyzeConfig]:
        section = self.analyze
        if not section.enabled:
            return []
        return [
            AnalyzeConfig(
                vary=vary,
                activations=section.activations,
                langs=tuple(parse_languages(",".join(section.langs))),
                corpus=section.corpus,
                seqlen=section.seqlen,
                stride=section.stride,
                max_documents=section.max_docs,
                lape_ratio=section.lape_ratio,
                lsar_rank=section.lsar_rank,
                device=self.prune.device,
                data_dir=data_dir,
            )
            for vary in section.group_by
        ]


SECTIONS = {
    "grid": Grid,
    "calibration": CalibrationSection,
    "prune": PruneSection,
    "evaluate": EvalSection,
    "analyze": AnalyzeSection,
}
_FILE_SECTIONS = {"study": None, "grid": "grid", "calibration": "calibration", "prune": "prune"}
_FILE_SECTIONS |= {"eval": "evaluate", "analyze": "analyze"}


def _section(kind: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise CpsError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(kind)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise CpsError(f"unknown key {key!r} in [{name}]; known: {', '.join(sorted(known))}")
        default = getattr(kind(), key)
        if isinstance(value, dict) and isinstance(default, tuple):  # a table: name = value pairs
            value = tuple(sorted(value.items()))
        elif isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or (default and not value):  # () defaults may be empty
                raise CpsError(f"[{name}] {key} must be a {'non-empty ' if default else ''}list")
            value = tuple(value)
        values[key] = value
    return kind(**values)


def load_study(path: str | Path, data_dir: str | None = None) -> Study:
    """Read and check a study file; every cell's configs are built (and so validated) here."""
    path = Path(path)
    if not path.is_file():
        raise CpsError(f"no study file {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CpsError(f"{path}: not valid TOML ({error})") from None
    return parse_study(raw, data_dir, text, default_name=path.stem)


def parse_study(
    raw: dict[str, Any], data_dir: str | None = None, source: str = "", default_name: str = "study"
) -> Study:
    unknown = set(raw) - set(_FILE_SECTIONS)
    if unknown:
        raise CpsError(f"unknown section [{sorted(unknown)[0]}]; known: {', '.join(_FILE_SECTIONS)}")
    head = raw.get("study", {})
    if not isinstance(head, dict) or set(head) - {"name", "description"}:
        raise CpsError("[study] takes name and description")
    parts = {
        attribute: _section(SECTIONS[attribute], section, raw.get(section, {}))
        for section, attribute in _FILE_SECTIONS.items()
        if attribute
    }
    try:
        study = Study(
            name=str(head.get("name", default_name)),
            description=str(head.get("description", "")),
            source=source,
            **parts,
        )
        return Study(**{**study.__dict__, "cells": tuple(_cells(study, data_dir))})
    except (TypeError, ValueError) as error:
        raise CpsError(f"bad study file: {error}") from None


def _cells(study: Study, data_dir: str | None) -> list[Cell]:
    grid, calib, prune = study.grid, study.calibration, study.prune
    evaluate = _eval_template(study, data_dir)
    options = MethodOptions(prune.blocksize, prune.dampening)
    engine = EngineConfig(device=prune.device, true_sequential=prune.true_sequential)
    targets = []
    for pattern in grid.patterns:
        if pattern == "unstructured":
            targets += [SparsityTarget.parse(pattern, float(s)) for s in grid.sparsities]
        else:
            targets.append(SparsityTarget.parse(pattern, None))
    cells = []
    for model in grid.models:
        if grid.dense_baseline:
            dense = PruneConfig(
                CalibrationConfig(model, "en", data_dir=data_dir), DENSE, dtype=prune.dtype, save_model=False
            )
            cells.append(Cell(dense, evaluate))
        for method, target, lang, seed in itertools.product(
            grid.methods, targets, grid.calib_langs, grid.seeds
        ):
            if method == DENSE:
                raise CpsError("list the dense baseline as dense_baseline = true, not as a method")
            calibration = CalibrationConfig(
                model, str(lang), calib.corpus, calib.nsamples, calib.seqlen, int(seed), data_dir
            )
            config = PruneConfig(
                calibration, method, target, options, engine, prune.dtype, save_model=prune.save_model
            )
            cells.append(Cell(config, evaluate))
    if not cells:
        raise CpsError("the study's grid has no cells")
    keys = [json.dumps(cell.key, sort_keys=True) for cell in cells]
    if len(set(keys)) != len(keys):
        raise CpsError("the study's grid names the same cell twice")
    return cells


def _eval_template(study: Study, data_dir: str | None) -> EvalConfig:
    section, prune = study.evaluate, study.prune
    return EvalConfig(
        run_id="pending",  # each cell's run id replaces it
        langs=tuple(parse_languages(",".join(section.langs))),
        tasks=tuple(section.tasks),
        corpus=section.corpus,
        seqlen=section.seqlen,
        stride=section.stride,
        limit=section.limit,
        task_limits=section.task_limits,
        max_documents=section.max_docs,
        batch_size=section.batch_size,
        device=prune.device,
        dtype=prune.dtype,
        data_dir=data_dir,
    )


def check_inputs(study: Study, data_dir: str | None) -> None:
    """Every corpus, language and task the study reads exists: a missing one fails before any work."""
    from cps.data import get_corpus
    from cps.evaluation.tasks import expand_tasks, task_configs

    calibration = get_corpus(study.calibration.corpus, data_dir)
    for cell in study.cells:
        if cell.prune.method != DENSE:
            for lang in cell.prune.calibration.mixture:
                calibration.require(lang)
    held_out = get_corpus(study.evaluate.corpus, data_dir)
    langs = [held_out.require(lang) for lang in study.evaluate.langs]
    task_configs(expand_tasks(list(study.evaluate.tasks), langs, data_dir), data_dir)
    for config in study.analyze_configs(data_dir):
        if config.activations:
            analysis = get_corpus(config.corpus, data_dir)
            for lang in config.langs:
                analysis.require(lang)
