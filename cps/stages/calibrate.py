"""`cps calibrate`: build (or reuse) a calibration set and record it as a `cps.stage=calibrate` run."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cps import tracking
from cps.config import CalibrationConfig
from cps.data.calibration import CalibrationSet, build_calibration
from cps.models import load_tokenizer, model_id, resolve_model
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


def run_calibrate(config: CalibrationConfig, store: tracking.Store) -> CalibrateResult:
    tracking.client(store)  # an unreachable store fails before any work
    calib = build_calibration(config, load_tokenizer(config.model))
    previous = tracking.find_runs(store, "calibrate", {"calib_hash": calib.calib_hash, "model": config.model})
    if previous:
        return CalibrateResult(calib, previous[0].run_id, reused_run=True)
    run_name = f"calib-{config.model}-{calib.calib_lang}-{config.nsamples}x{config.seqlen}"
    with tracking.start_run(store, "calibrate", calibration_params(config, calib), run_name) as run:
        run.log_metrics(calib.summary_metrics())
        run.set_tags({"cps.calib_cache_hit": calib.cache_hit})
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(calib.cache_path, Path(folder) / CALIBRATION_ARTIFACT)
            stats = {code: {**asdict(s), "coverage": s.coverage} for code, s in calib.stats.items()}
            (Path(folder) / "calibration_stats.json").write_text(json.dumps(stats, indent=2))
            run.log_artifact(folder)
    return CalibrateResult(calib, run.run_id, reused_run=False)
