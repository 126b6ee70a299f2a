"""`cps calibrate`: build (or reuse) a calibration set and record it as a `cps.stage=calibrate` run."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cps import tracking
from cps.config import CalibrationConfig
from cps.data import get_corpus
from cps.data.calibration import CalibrationSet, build_calibration, known_fingerprint, record_fingerprint
from cps.errors import CpsError
from cps.models import load_tokenizer, model_id, model_location, resolve_model
from cps.notes import describe
from cps.runs import CALIBRATION_ARTIFACT


@dataclass
class CalibrateResult:
    calib: CalibrationSet
    run_id: str
    reused_run: bool


def calibration_params(config: CalibrationConfig, calib: CalibrationSet) -> dict[str, object]:
    """The params every run built on this calibration set carries (DESIGN.md schema)."""
    return {
        "model": config.model,
        "model_id": model_id(resolve_model(config.model)),
        "calib_lang": calib.calib_lang,
        "calib_corpus": config.corpus,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "seed": config.seed,
        "calib_hash": calib.calib_hash,
    }


def calibration_dataset(calib: CalibrationSet) -> tracking.DatasetRecord:
    """The calibration windows as an MLflow dataset input (digest: the calibration hash)."""
    config = calib.config
    try:
        source = str(get_corpus(config.corpus, config.data_dir).root)
    except CpsError:  # a calibrate run's set read back where its corpus is absent
        source = config.corpus
    return tracking.DatasetRecord(
        name=f"{config.corpus}:{calib.calib_lang}",
        digest=calib.calib_hash,
        source=source,
        context="calibration",
        profile={"windows": config.nsamples, "seqlen": config.seqlen, "seed": config.seed},
    )


def tokenizer_or_fingerprint(model: str) -> tuple[Any, str | None]:
    """The model's tokenizer and its fingerprint; when the fingerprint was recorded before, a
    function loading the tokenizer (once) instead: cached calibration sets and held-out windows
    then never load it."""
    folder = Path(model_location(resolve_model(model)))
    if folder.is_dir():
        known = known_fingerprint(folder)
        if known is not None:
            return functools.cache(lambda: load_tokenizer(model)), known
        tokenizer = load_tokenizer(model)
        return tokenizer, record_fingerprint(folder, tokenizer)
    return load_tokenizer(model), None


def run_calibrate(
    config: CalibrationConfig, store: tracking.Store, tags: Mapping[str, str] | None = None
) -> CalibrateResult:
    """Build (or reuse) the set; a new calibrate run carries `tags` (a sweep's: nested under it)."""
    tracking.client(store)  # an unreachable store fails before any work
    calib = build_calibration(config, *tokenizer_or_fingerprint(config.model))
    previous = tracking.find_runs(store, "calibrate", {"calib_hash": calib.calib_hash, "model": config.model})
    if previous:
        return CalibrateResult(calib, previous[0].run_id, reused_run=True)
    run_name = f"calib-{config.model}-{calib.calib_lang}-{config.nsamples}x{config.seqlen}"
    with tracking.start_run(store, "calibrate", calibration_params(config, calib), run_name, tags) as run:
        run.log_metrics(calib.summary_metrics())
        tracking.log_datasets(run, [calibration_dataset(calib)])
        run.set_tags({"cps.calib_cache_hit": calib.cache_hit})
        describe(store, run.run_id)
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(calib.cache_path, Path(folder) / CALIBRATION_ARTIFACT)
            stats = {code: {**asdict(s), "coverage": s.coverage} for code, s in calib.stats.items()}
            (Path(folder) / "calibration_stats.json").write_text(json.dumps(stats, indent=2))
            run.log_artifact(folder)
    return CalibrateResult(calib, run.run_id, reused_run=False)
