"""Study files: a grid of prune cells plus what to evaluate and analyse, read from TOML.

    [study]        name, description
    [grid]         models, methods, patterns, sparsities, calib_langs, seeds, dense_baseline,
                   allocations (uniform | owl), refines (none | dsnot), calib_corpora,
                   bits (weight bits; 0 = unquantized), group_sizes
    [calibration]  corpus (or self: text the model generates), nsamples, seqlen (CalibrationConfig)
    [prune]        dtype, device, save_model, true_sequential, blocksize, dampening,
                   offload_activations, batch_tokens, owl_m, owl_lambda, ria_a,
                   dsnot_cycles, dsnot_threshold, dsnot_var_power, dsnot_skip, sym, act_order,
                   quant  (PruneConfig)
    [eval]         every EvalConfig field but device and dtype (those of [prune]); task_limits is
                   a table (family = items)
    [analyze]      every AnalyzeConfig field but filters and device; group_by may list several
                   params (one analysis each); enabled = false turns the analyses off
    [findings]     delta: the equivalence margin of the report's verdicts (default 0.02 = 2
                   accuracy points), recorded on the sweep run for `cps report`

The keys are the field names of `cps.config`, so a new option there is a new key here. A cell is one
(model, method, pattern/sparsity, calibration language, seed): one prune run that is also evaluated
before it ends; a calibration language may be a mixture or a recipe (`sw+en`, `all`). `unstructured`
takes every sparsity of the grid; an N:M pattern is one cell (its sparsity is 1 - N/M); a
quantization method (gptq, rtn) prunes nothing: one cell per bits and group size, whatever the
sparsities. Methods cross allocations, refinements, bits and group sizes (a pruning method with
bits > 0 is pruned and quantized: SparseGPT jointly); a combination a method cannot take
(`config.combination_error`: OWL or layer removal with N:M, DSnoT after SparseGPT) is left out. With
`dense_baseline` each model also gets a dense cell. Every value is checked when the file is read,
so a typo fails before any work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cps.analysis.findings import DELTA
from cps.config import (
    ALLOCATIONS,
    DENSE,
    AnalyzeConfig,
    CalibrationConfig,
    EvalConfig,
    PruneConfig,
    combination_error,
    variant,
)
from cps.data import get_corpus
from cps.data.calibration import check_sources
from cps.errors import CpsError
from cps.evaluation.tasks import check_eval_inputs
from cps.languages import PAPER_LANGUAGES, parse_languages
from cps.metrics import split_task
from cps.models import resolve_model
from cps.pruning.base import method_class, refinement_class
from cps.pruning.quant import QuantGrid


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...] = ("gemma3-270m",)
    methods: tuple[str, ...] = ("wanda", "sparsegpt")
    patterns: tuple[str, ...] = ("unstructured",)
    sparsities: tuple[float, ...] = (0.5,)
    calib_langs: tuple[str, ...] = PAPER_LANGUAGES
    seeds: tuple[int, ...] = (0,)
    dense_baseline: bool = True
    allocations: tuple[str, ...] = ("uniform",)  # uniform | owl: each method with each
    refines: tuple[str, ...] = ("none",)  # none | dsnot: each method with each
    calib_corpora: tuple[str, ...] = ()  # calibration corpora crossed with calib_langs; () = [calibration]'s
    bits: tuple[int, ...] = (0,)  # weight bits (2-8); 0: not quantized (a quantization method needs > 0)
    group_sizes: tuple[int, ...] = (128,)  # quantized cells: input columns per scale (-1: per channel)


CALIBRATION_KEYS = ("corpus", "nsamples", "seqlen")
PRUNE_KEYS = (
    "dtype",
    "device",
    "save_model",
    "true_sequential",
    "blocksize",
    "dampening",
    "offload_activations",
    "batch_tokens",
    "stream",
    "owl_m",
    "owl_lambda",
    "ria_a",
    "dsnot_cycles",
    "dsnot_threshold",
    "dsnot_var_power",
    "dsnot_skip",
    "sym",
    "act_order",
    "quant",
)
PRUNE_DEFAULTS = {"device": "auto", "save_model": False}  # a sweep: any GPU, no 1 GB copies
EVAL_KEYS = tuple(f.name for f in fields(EvalConfig) if f.name not in ("device", "dtype", "data_dir"))
ANALYZE_KEYS = (
    *(f.name for f in fields(AnalyzeConfig) if f.name not in ("filters", "device", "data_dir")),
    "enabled",
)


@dataclass(frozen=True)
class Cell:
    """One prune run of the grid (evaluated inside it)."""

    prune: PruneConfig
    evaluate: EvalConfig

    @property
    def key(self) -> dict[str, str]:
        """The params that identify this cell's finished run in the store (as MLflow keeps them)."""
        return {name: str(value) for name, value in self.prune.identity().items()}

    @property
    def label(self) -> str:
        key = self.key
        if key["method"] == DENSE:
            return f"{key['model']} dense"
        sparsity = key["pattern"] if key["pattern"] != "unstructured" else f"{float(key['sparsity']):.0%}"
        corpus = "" if key["calib_corpus"] == "ntrex" else f" corpus={key['calib_corpus']}"
        calib = f"calib={key['calib_lang']}{corpus}"
        return f"{key['model']} {self.prune.variant} {sparsity} {calib} seed={key['seed']}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    grids: tuple[Grid, ...]  # one per [[grid]] block
    evaluate: EvalConfig
    analyses: tuple[AnalyzeConfig, ...]  # one per group_by param; none when disabled
    cells: tuple[Cell, ...] = field(default=(), repr=False)
    source: str = ""  # the file's text, logged with the sweep
    findings_delta: float = DELTA  # [findings] delta: the report's equivalence margin (accuracy)

    @property
    def fingerprint(self) -> str:
        """Identifies the grid and settings (not the name, comments or data location): the sweep's
        parent run."""
        analyses = [
            {k: v for k, v in asdict(a).items() if k not in ("device", "data_dir")} for a in self.analyses
        ]
        payload = {
            "cells": [cell.key for cell in self.cells],
            "eval": self.evaluate.fingerprint(),
            "analyze": analyses,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _values(kind: type, section: str, raw: Any, keys: Collection[str]) -> dict[str, Any]:
    """The `keys` of a TOML table, lists as tuples (tables as sorted pairs) where `kind` has tuples."""
    if not isinstance(raw, dict):
        raise CpsError(f"[{section}] must be a table")
    defaults = {f.name: f.default for f in fields(kind)}
    values = {}
    for key, value in raw.items():
        if key not in keys:
            raise CpsError(f"unknown key {key!r} in [{section}]; known: {', '.join(sorted(keys))}")
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, tuple):  # a table: name = value pairs
            value = tuple(sorted(value.items()))
        elif isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or (default and not value):  # () defaults may be empty
                raise CpsError(f"[{section}] {key} must be a {'non-empty ' if default else ''}list")
            value = tuple(value)
        values[key] = value
    return values


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


SECTIONS = ("study", "grid", "calibration", "prune", "eval", "analyze", "findings")


def parse_study(
    raw: dict[str, Any], data_dir: str | None = None, source: str = "", default_name: str = "study"
) -> Study:
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise CpsError(f"unknown section [{sorted(unknown)[0]}]; known: {', '.join(SECTIONS)}")
    head = raw.get("study", {})
    if not isinstance(head, dict) or set(head) - {"name", "description"}:
        raise CpsError("[study] takes name and description")
    try:
        grids = _grids(raw.get("grid", {}))
        calibration = _values(CalibrationConfig, "calibration", raw.get("calibration", {}), CALIBRATION_KEYS)
        prune = PRUNE_DEFAULTS | _values(PruneConfig, "prune", raw.get("prune", {}), PRUNE_KEYS)
        evaluate = _values(EvalConfig, "eval", raw.get("eval", {}), EVAL_KEYS)
        evaluate["langs"] = tuple(parse_languages(",".join(evaluate.get("langs", PAPER_LANGUAGES))))
        eval_config = EvalConfig(
            **evaluate, device=prune["device"], dtype=prune.get("dtype", "auto"), data_dir=data_dir
        )
        analyses = _analyses(raw.get("analyze", {}), prune["device"], data_dir)
        cells = _distinct(
            [c for grid in grids for c in _cells(grid, calibration, prune, eval_config, data_dir)]
        )
    except (TypeError, ValueError) as error:
        raise CpsError(f"bad study file: {error}") from None
    name, description = str(head.get("name", default_name)), str(head.get("description", ""))
    delta = _findings_delta(raw.get("findings", {}))
    return Study(name, description, grids, eval_config, analyses, tuple(cells), source, delta)


def _grids(raw: Any) -> tuple[Grid, ...]:
    """[grid], or several [[grid]] blocks (their cells together: e.g. every method at every
    sparsity, then the recipes for two of them)."""
    blocks = raw if isinstance(raw, list) else [raw]
    if not blocks:
        raise CpsError("[[grid]] needs at least one block")
    names = [f.name for f in fields(Grid)]
    return tuple(Grid(**_values(Grid, "grid", block, names)) for block in blocks)


def _distinct(cells: list[Cell]) -> list[Cell]:
    """Cells in order, each once: blocks of a study may share cells (the dense baselines)."""
    seen: set[str] = set()
    kept = []
    for cell in cells:
        key = json.dumps(cell.key, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(cell)
    return kept


def _findings_delta(raw: Any) -> float:
    """[findings] delta: the equivalence margin of the report's verdicts, in accuracy / 100."""
    if not isinstance(raw, dict) or set(raw) - {"delta"}:
        raise CpsError("[findings] takes delta (the equivalence margin, e.g. 0.02 for 2 accuracy points)")
    delta = raw.get("delta", DELTA)
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise CpsError(f"[findings] delta must be a number in (0, 1) (got {delta!r})")
    return float(delta)


def _analyses(raw: Any, device: str, data_dir: str | None) -> tuple[AnalyzeConfig, ...]:
    values = _values(AnalyzeConfig, "analyze", raw, ANALYZE_KEYS)
    if not values.pop("enabled", True):
        return ()
    group_by = values.pop("group_by", ("calib_lang",))
    values["langs"] = tuple(parse_languages(",".join(values.get("langs", PAPER_LANGUAGES))))
    params = [group_by] if isinstance(group_by, str) else list(group_by)
    return tuple(AnalyzeConfig(str(p), **values, device=device, data_dir=data_dir) for p in params)


def _check_axes(grid: Grid) -> None:
    """Every method, allocation and refinement of a grid exists: a typo fails here, before the
    combinations that make no sense are left out (which would leave out a misspelled one too)."""
    for method in grid.methods:
        if method != DENSE:
            method_class(method)
    for allocation in grid.allocations:
        if allocation not in ALLOCATIONS:
            raise CpsError(f"unknown allocation {allocation!r} in [grid]; use {' or '.join(ALLOCATIONS)}")
    for refine in grid.refines:
        if refine != "none":
            refinement_class(refine)
    for bits in grid.bits:
        if bits != 0:
            QuantGrid(int(bits))
    for group in grid.group_sizes:
        QuantGrid(group_size=int(group))


def left_out(study: Study) -> list[str]:
    """The grid's combinations a method cannot take (`combination_error`), one line each, for the
    dry run: `method pattern allocation refine: why`."""
    lines = {}
    for grid in study.grids:
        for method, allocation, refine, pattern, bits in itertools.product(
            grid.methods, grid.allocations, grid.refines, grid.patterns, grid.bits
        ):
            why = combination_error(method, pattern, allocation, refine, bits or None)
            if why:
                quant = f"w{bits}" if bits else None
                lines[f"{variant(method, allocation, refine, quant)} {pattern}"] = why
    return [f"{name}: {why}" for name, why in lines.items()]


def _cells(
    grid: Grid, calibration: dict[str, Any], prune: dict[str, Any], evaluate: EvalConfig, data_dir: str | None
) -> list[Cell]:
    targets: list[tuple[str, float | None]] = []
    for pattern in grid.patterns:  # unstructured takes every sparsity; N:M implies its own
        unstructured = pattern == "unstructured"
        targets += [(pattern, float(s)) for s in grid.sparsities] if unstructured else [(pattern, None)]
    cells = []
    for model in grid.models:
        if grid.dense_baseline:
            dense = PruneConfig(
                model, None, dtype=prune.get("dtype", "auto"), device=prune["device"], save_model=False
            )
            cells.append(Cell(dense, evaluate))
        _check_axes(grid)
        corpora = grid.calib_corpora or (calibration.get("corpus", CalibrationConfig.corpus),)
        axes = (grid.methods, grid.allocations, grid.refines, targets, grid.bits, grid.group_sizes)
        combinations = itertools.product(*axes, corpora, grid.calib_langs, grid.seeds)
        for method, allocation, refine, (pattern, sparsity), bits, group, corpus, lang, seed in combinations:
            if method == DENSE:
                raise CpsError("list the dense baseline as dense_baseline = true, not as a method")
            if combination_error(method, pattern, allocation, refine, bits or None):  # e.g. OWL with 2:4
                continue
            quantizes = method_class(method).quantizes
            if quantizes and (pattern, sparsity) != targets[0]:
                continue  # prunes nothing: one cell, whatever the sparsities
            if not bits and group != grid.group_sizes[0]:
                continue  # unquantized: the group size means nothing
            settings = {**calibration, "corpus": corpus}
            calib = CalibrationConfig(model, str(lang), seed=int(seed), data_dir=data_dir, **settings)
            config = PruneConfig(
                model,
                method,
                calib,
                pattern=pattern,
                sparsity=None if quantizes else sparsity,
                allocation=allocation,
                refine=refine,
                bits=bits or None,
                group_size=group,
                **prune,
            )
            cells.append(Cell(config, evaluate))
    if not cells:
        raise CpsError("the study's grid has no cells")
    keys = [json.dumps(cell.key, sort_keys=True) for cell in cells]
    if len(set(keys)) != len(keys):
        raise CpsError("the study's grid names the same cell twice")
    return cells


def check_inputs(study: Study, read_tasks: bool = True) -> list[str]:
    """Every corpus, language and task the study reads exists: a missing one fails before any work.
    Returns the evaluation's task names, expanded. `read_tasks=False` (a dry run) checks the task
    names and languages without reading task data (MKQA may come from the hub only at run time)."""
    for cell in study.cells:
        calibration = cell.prune.calibration
        if calibration is not None:
            check_sources(calibration)
    _, tasks = check_eval_inputs(study.evaluate, read_tasks)
    for config in study.analyses:
        if config.activations:
            analysis = get_corpus(config.corpus, config.data_dir)
            for lang in config.langs:
                analysis.require(lang)
    return tasks


# ---------------------------------------------------------------------------------------------
# What a study costs on GPUs, derived (no GPU was at hand to measure one): each forward pass costs
# 2 x parameters FLOPs per token, at an effective `tflops` (an H100's 989 dense bf16 TFLOP/s at
# ~40% utilisation). Pruning costs a multiple of one dense pass over the calibration tokens, the
# ratio measured by benchmarks/prune_bench.py on the CPU (Wanda 2.3x, SparseGPT 3.0x); evaluation
# is one pass over the held-out tokens and the task requests (items x choices x tokens per request,
# every choice its own request).

PRUNE_PASSES = {"wanda": 2.3, "magnitude": 2.3, "sparsegpt": 3.0, "gptq": 3.0, "rtn": 2.3}
HELD_OUT_TOKENS = 12_000  # FLORES dev+test per language (8k en to 13k sw tokens measured, Gemma-3)
TASK_TOKENS = {  # per (family, language): items x choices x tokens per request, order of magnitude
    "belebele": 900 * 4 * 500,
    "mmlu": 14_042 * 4 * 150,
    "arc": 1_172 * 4 * 60,
    "hellaswag": 10_042 * 4 * 100,
    "sib": 303 * 7 * 60,
    "flores_next": 70 * 8 * 60,
    "xcopa": 600 * 2 * 30,
    "mkqa": 10_000 * 60,  # one greedy answer: ~20 prompt + up to 32 generated tokens
}


@dataclass(frozen=True)
class CostEstimate:
    cells: int
    gpu_hours: float | None  # None when a model's size is unknown
    tflops: float


def estimate_gpu_hours(study: Study, tasks: list[str], tflops: float = 400.0) -> CostEstimate:
    """The study's GPU hours by the formula above; `tasks` are the expanded task names."""
    task_tokens = sum(TASK_TOKENS.get(split_task(name)[0], 0) for name in tasks)
    eval_tokens = HELD_OUT_TOKENS * len(study.evaluate.langs) + task_tokens
    seconds = 0.0
    for cell in study.cells:
        billions = resolve_model(cell.prune.model).parameters
        if billions is None:
            return CostEstimate(len(study.cells), None, tflops)
        per_token = 2 * billions * 1e9 / (tflops * 1e12)  # seconds of one forward per token
        calibration = cell.prune.calibration
        if calibration is not None:
            passes = PRUNE_PASSES.get(cell.prune.method_name, 3.0)
            seconds += passes * per_token * calibration.nsamples * calibration.seqlen
        seconds += per_token * eval_tokens
    return CostEstimate(len(study.cells), seconds / 3600, tflops)
