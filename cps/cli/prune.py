"""`cps prune`: prune a model calibrated on one language (or mixture) and log everything to MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cps.cli.options import (
    ActOrder,
    BatchTokens,
    Blocksize,
    CalibLang,
    CalibRun,
    ComputeDevice,
    ComputeDtype,
    Corpus,
    Dampening,
    DataDir,
    Experiment,
    GroupSize,
    Model,
    NSamples,
    OffloadActivations,
    SaveModel,
    Seed,
    SeqLen,
    Stream,
    Symmetric,
    TrackingUri,
    TrueSequential,
)

if TYPE_CHECKING:
    from cps.config import PruneConfig
    from cps.tracking import Store


def prune_command(
    lang: CalibLang = None,
    model: Model = "gemma3-270m",
    method: Annotated[
        str, typer.Option(help="wanda | sparsegpt | ria | magnitude | shortgpt (whole layers) | dense.")
    ] = "wanda",
    sparsity: Annotated[
        float | None, typer.Option(help="Unstructured sparsity in [0, 1); default 0.5.")
    ] = None,
    pattern: Annotated[
        str, typer.Option(help="unstructured, or N:M (N weights kept in every M, e.g. 2:4).")
    ] = "unstructured",
    corpus: Corpus = "ntrex",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    calib: CalibRun = None,
    true_sequential: TrueSequential = False,
    blocksize: Blocksize = 128,
    dampening: Dampening = 0.01,
    allocation: Annotated[
        str,
        typer.Option(help="Sparsity per decoder layer: uniform | owl (outlier-weighted, arXiv 2310.05175)."),
    ] = "uniform",
    owl_m: Annotated[
        float, typer.Option(help="OWL: outliers are scores above M x their layer's mean.")
    ] = 5.0,
    owl_lambda: Annotated[
        float, typer.Option(help="OWL: layer sparsities over a range 2 x lambda wide.")
    ] = 0.08,
    refine: Annotated[
        str, typer.Option(help="Mask refinement after the method: none | dsnot (arXiv 2310.08915).")
    ] = "none",
    ria_a: Annotated[float, typer.Option(help="RIA: exponent a of ||X_j||^a.")] = 0.5,
    dsnot_cycles: Annotated[int, typer.Option(help="DSnoT: swaps per row at most.")] = 50,
    dsnot_threshold: Annotated[float, typer.Option(help="DSnoT: stop a row below this error.")] = 0.1,
    dsnot_var_power: Annotated[float, typer.Option(help="DSnoT: regrow by W E[X] / Var(X)^power.")] = 1.0,
    dsnot_skip: Annotated[
        str, typer.Option(help="DSnoT: sub-block left unrefined: mlp (the reference) | self_attn | none.")
    ] = "mlp",
    bits: Annotated[
        int | None,
        typer.Option(
            help="Quantize the pruned weights too (2-8 bits; SparseGPT: joint, in its own column loop)."
        ),
    ] = None,
    quant: Annotated[
        str, typer.Option(help="With --bits: gptq (error feedback; joint with SparseGPT) | rtn.")
    ] = "gptq",
    group_size: GroupSize = 128,
    sym: Symmetric = True,
    act_order: ActOrder = False,
    device: ComputeDevice = "cpu",
    dtype: ComputeDtype = "auto",
    offload_activations: OffloadActivations = False,
    stream: Stream = None,
    batch_tokens: BatchTokens = 2048,
    save_model: SaveModel = True,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Prune with Wanda, SparseGPT, RIA, magnitude or ShortGPT (whole layers), optionally with OWL's
    layer-wise sparsity, DSnoT's mask refinement and quantization (--bits); log params, per-layer
    error/SNR, masks and model."""
    from cps.config import DENSE, CalibrationConfig, PruneConfig
    from cps.tracking import Store

    dense = method == DENSE
    calibration = None
    if lang is not None and not dense and calib is None:
        calibration = CalibrationConfig(model, lang, corpus, nsamples, seqlen, seed, data_dir)
    config = PruneConfig(
        model=model,
        method=None if dense else method,
        calibration=calibration,
        pattern=pattern,
        sparsity=sparsity,
        blocksize=blocksize,
        dampening=dampening,
        device=device,
        dtype=dtype,
        true_sequential=true_sequential,
        offload_activations=offload_activations,
        batch_tokens=batch_tokens,
        calib_run=calib,
        save_model=save_model,
        stream=stream,
        allocation=allocation,
        owl_m=owl_m,
        owl_lambda=owl_lambda,
        refine=refine,
        ria_a=ria_a,
        dsnot_cycles=dsnot_cycles,
        dsnot_threshold=dsnot_threshold,
        dsnot_var_power=dsnot_var_power,
        dsnot_skip=dsnot_skip,
        bits=bits,
        quant=quant,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
    )
    run_and_summarize(config, Store(tracking_uri, experiment))


def run_and_summarize(config: PruneConfig, store: Store) -> None:
    """One prune (or quantize) run and its summary lines."""
    from cps.stages.prune import run_prune

    result = run_prune(config, store)
    metrics = result.metrics
    typer.echo(f"run {result.run_id}: {config.variant} {config.target.pattern} on {config.model}")
    if "sparsity.mask" in metrics:  # quantized
        typer.echo(
            f"  pruned share {metrics['sparsity.mask']:.4f}; zeros stored {metrics['sparsity.actual']:.4f} "
            "(with the weights that round to 0)"
        )
    else:
        typer.echo(f"  actual sparsity {metrics['sparsity.actual']:.4f}")
    if "calib_snr_db.mean" in metrics:
        typer.echo(
            f"  on its calibration tokens (in-sample): mean SNR {metrics['calib_snr_db.mean']:.2f} dB, "
            f"total error {metrics['calib_error.total']:.4g}; held-out SNR per language: cps eval"
        )
    typer.echo(f"  {metrics['time.prune_s']:.1f} s pruning, peak RSS {metrics['mem.peak_rss_gb']:.2f} GB")
    typer.echo(f"  look: `make ui` (MLflow at http://127.0.0.1:5000), store {store.resolved_uri}")
