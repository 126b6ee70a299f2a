"""Options shared by several commands (Typer annotations)."""

from __future__ import annotations

from typing import Annotated

import typer

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db).",
    ),
]
Experiment = Annotated[str, typer.Option("--experiment", help="MLflow experiment name.")]
DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", help="Corpora root (default: $CPS_DATA_DIR, else ./data)."),
]
Model = Annotated[str, typer.Option("--model", "-m", help="Alias (see `cps models`), hub id or folder.")]
Corpus = Annotated[
    str,
    typer.Option(
        "--corpus",
        help="ntrex | flores | mc4 | textdir:<folder of <lang>.txt> | self (calibration: text the dense "
        "model samples itself, prompted by the start of an NTREX document).",
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (windows, and everything after).")]
NSamples = Annotated[int, typer.Option("--nsamples", help="Calibration windows.")]
SeqLen = Annotated[int, typer.Option("--seqlen", help="Tokens per calibration window.")]


def parse_filters(items: list[str] | None, option: str = "--filter") -> tuple[tuple[str, str], ...]:
    """`--filter key=value` options (or another key=value option) as pairs; a malformed one is a CpsError."""
    from cps.errors import CpsError

    filters = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            example = "method=wanda" if option == "--filter" else "sib=2"
            raise CpsError(f"bad {option} {item!r}; use key=value, e.g. {example}")
        filters.append((key.strip(), value.strip()))
    return tuple(filters)


Stream = Annotated[
    bool | None,
    typer.Option(
        "--stream/--no-stream",
        help="Read the model layer by layer from its shards (default: when it would not fit in 60% "
        "of free memory).",
        show_default=False,
    ),
]
OffloadActivations = Annotated[
    bool, typer.Option(help="Streamed: keep every window's activations in files between layers.")
]

# Weight quantization (`cps quantize`, and `--bits` on `cps prune`): the grid of compressed-tensors
GroupSize = Annotated[
    int,
    typer.Option("--group-size", help="Input columns per scale (GPTQ's g128); -1: one per output channel."),
]
Symmetric = Annotated[
    bool,
    typer.Option(
        "--sym/--asym", help="Symmetric grid (zero point 0) or asymmetric (min-max with a zero point)."
    ),
]
ActOrder = Annotated[
    bool, typer.Option("--act-order/--no-act-order", help="GPTQ: columns in descending order of diag(X^T X).")
]
Blocksize = Annotated[int, typer.Option(help="SparseGPT/GPTQ: columns per lazy batch update.")]
Dampening = Annotated[float, typer.Option(help="SparseGPT/GPTQ: dampening, a share of mean diag H.")]

# The calibrated compression commands (`cps prune`, `cps quantize`)
CalibLang = Annotated[
    str | None,
    typer.Option("--lang", "-l", help="Calibration language, mixture (en:0.5,sw:0.5), recipe (sw+en, all)."),
]
CalibRun = Annotated[
    str | None, typer.Option("--calib", help="Reuse the calibration set of this calibrate run.")
]
TrueSequential = Annotated[bool, typer.Option(help="Attention then MLP sub-blocks in order.")]
ComputeDevice = Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto.")]
ComputeDtype = Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16.")]
BatchTokens = Annotated[int, typer.Option(help="Calibration tokens per forward batch.")]
SaveModel = Annotated[
    bool, typer.Option(help="Log the weights as model/ (compressed-tensors where quantized).")
]
