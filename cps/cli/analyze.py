"""`cps analyze`: cross-run analyses of comparison groups found in the tracking store."""

from __future__ import annotations

from typing import Annotated

import typer

from cps.cli.options import DataDir, Experiment, TrackingUri, parse_filters


def analyze_command(
    group_by: Annotated[str, typer.Option(help="The param that varies within a group.")] = "calib_lang",
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Only runs with this param value (key=value).")
    ] = None,
    activations: Annotated[
        bool, typer.Option(help="Also LAPE, LSAR and cross-language SNR on held-out text (loads models).")
    ] = False,
    langs: Annotated[
        str, typer.Option(help="Held-out languages for the activation analyses.")
    ] = "ar,de,en,es,ru,sw,zh",
    corpus: Annotated[str, typer.Option(help="Held-out text: flores, or textdir:<folder>.")] = "flores",
    max_docs: Annotated[
        int | None, typer.Option(help="Held-out documents per language (quick runs).")
    ] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per held-out window, BOS included.")] = 512,
    stride: Annotated[
        int | None, typer.Option(help="Window step inside a long document (default seqlen // 2).")
    ] = None,
    lape_ratio: Annotated[float, typer.Option(help="Share of neurons called language-specific.")] = 0.01,
    lsar_rank: Annotated[
        int | None, typer.Option(help="Language subspace rank (default languages - 1).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "cpu",
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "cps",
) -> None:
    """Mask IoU and SNR by calibration language (+ LAPE, LSAR, cross-language SNR), one run per group."""
    from cps.config import AnalyzeConfig
    from cps.languages import parse_languages
    from cps.stages.analyze import run_analyze
    from cps.tracking import Store

    filters = parse_filters(filter_)
    config = AnalyzeConfig(
        group_by=group_by,
        filters=filters,
        activations=activations,
        langs=tuple(parse_languages(langs)),
        corpus=corpus,
        seqlen=seqlen,
        stride=stride,
        max_docs=max_docs,
        lape_ratio=lape_ratio,
        lsar_rank=lsar_rank,
        device=device,
        data_dir=data_dir,
    )
    results = run_analyze(config, Store(tracking_uri, experiment))
    for result in results:
        shared = result.group.shared
        members = ", ".join(sorted(result.group.members))
        typer.echo(
            f"group {shared.get('model')} {shared.get('method')} {shared.get('pattern')} "
            f"sparsity {shared.get('sparsity')} seed {shared.get('seed')}: {group_by} = {members}"
        )
        typer.echo(
            f"  mean mask IoU {result.headlines['iou.mean']:.3f}; lowest in early layers: "
            f"{', '.join(result.lowest_modules)} "
            f"({'agrees with' if result.paper_agrees else 'differs from'} the paper: o_proj, down_proj)"
        )
        if result.activation_tables:
            from cps.analysis.cross_language import best_by_language

            overlap = result.activation_tables["lape_overlap"]
            typer.echo(
                f"  LAPE overlap with the dense model's language neurons: {overlap['overlap'].mean():.3f}"
            )
            best = best_by_language(result.activation_tables["cross_snr"], group_by)
            for eval_lang, winner in best.iter_rows():
                typer.echo(f"  {eval_lang} held-out text is best preserved by {group_by}={winner}")
        typer.echo(f"  analysis run {result.run_id}")
