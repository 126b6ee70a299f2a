"""`cps quantize`: weight-only quantization (GPTQ, or RTN as its baseline) calibrated on one
language, tracked as a prune run at sparsity 0 (its params say `bits`, `group_size`, `sym`,
`act_order`), its model saved in the compressed-tensors format. To prune and quantize: `cps prune
--bits` (SparseGPT quantizes in its own column loop, the joint mode; other methods are followed by
GPTQ on their pruned weights, the zeros held)."""

from __future__ import annotations

from typing import Annotated

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


def quantize_command(
    lang: CalibLang = None,
    model: Model = "gemma3-270m",
    method: Annotated[
        str, typer.Option(help="gptq | rtn (round to nearest: reads no calibration).")
    ] = "gptq",
    bits: Annotated[int, typer.Option(help="Bits per weight, 2 to 8.")] = 4,
    group_size: GroupSize = 128,
    sym: Symmetric = True,
    act_order: ActOrder = False,
    blocksize: Blocksize = 128,
    dampening: Dampening = 0.01,
    corpus: Corpus = "ntrex",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    calib: CalibRun = None,
    from_run: Annotated[
        str | None,
        typer.Option(
            "--from-run", help="Quantize this prune run's model (saved or rebuilt), its pruned zeros held."
        ),
    ] = None,
    true_sequential: TrueSequential = False,
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
    """Quantize the weights with GPTQ (or RTN) calibrated on a language; log params, per-layer
    error/SNR and the compressed-tensors model (transformers and vLLM load it)."""
    from cps.cli.prune import run_and_summarize
    from cps.config import CalibrationConfig, PruneConfig
    from cps.errors import CpsError
    from cps.pruning.base import method_class
    from cps.tracking import Store

    if not method_class(method).quantizes:
        raise CpsError(f"{method} prunes: use cps prune --method {method} (with --bits to quantize too)")
    calibration = None
    if lang is not None and calib is None:
        calibration = CalibrationConfig(model, lang, corpus, nsamples, seqlen, seed, data_dir)
    config = PruneConfig(
        model=model,
        method=method,
        calibration=calibration,
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
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        from_run=from_run,
    )
    run_and_summarize(config, Store(tracking_uri, experiment))
