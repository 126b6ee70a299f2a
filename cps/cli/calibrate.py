"""`cps calibrate`: random token windows of a language (or mixture) from a corpus, cached and logged."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import Corpus, DataDir, Experiment, Model, NSamples, Seed, SeqLen, TrackingUri


def calibrate_command(
    lang: Annotated[
        str, typer.Option("--lang", "-l", help="Language code, or a mixture like en:0.5,sw:0.5.")
    ],
    model: Model = "gemma3-270m",
    corpus: Corpus = "ntrex",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Build a calibration set (cached by content hash) and log it as an MLflow run."""
    from cps.config import CalibrationConfig
    from cps.stages.calibrate import run_calibrate
    from cps.tracking import Store

    config = CalibrationConfig(model, lang, corpus, nsamples, seqlen, seed, data_dir)
    result = run_calibrate(config, Store(tracking_uri, experiment))
    calib = result.calib
    metrics = calib.summary_metrics()
    source = "cache hit" if calib.cache_hit else "built"
    run_note = "existing run" if result.reused_run else "new run"
    typer.echo(
        f"calibration {calib.calib_hash} ({source}): {calib.input_ids.shape[0]} x "
        f"{calib.input_ids.shape[1]} tokens of {calib.calib_lang} from {corpus}"
    )
    for code, stats in calib.stats.items():
        overlap = " (windows overlap: corpus too small)" if stats.overlapping else ""
        typer.echo(
            f"  {code}: {stats.windows} windows, {stats.documents_used}/{stats.corpus_documents} "
            f"documents, coverage {stats.coverage:.1%} of {stats.corpus_tokens:,} tokens{overlap}"
        )
    typer.echo(f"run {result.run_id} ({run_note}); overall coverage {metrics['calib.coverage']:.1%}")
