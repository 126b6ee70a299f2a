"""`cps prune`: calibrate, prune with one method, and log a `cps.stage=prune` run with its artifacts."""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import torch
from torch import nn

from cps import tracking
from cps.config import DENSE, PruneConfig, quant_label, run_variant
from cps.data.calibration import CalibrationSet
from cps.errors import CpsError
from cps.models import (
    LoadedModel,
    forget_tokenizers,
    linear_input_widths,
    load_model,
    load_tokenizer,
    name_architecture,
    placement,
    resolve_model,
    tokenizer_loaded,
    weights_folder,
    without_layers,
)
from cps.notes import describe
from cps.pruning.base import get_method, method_class
from cps.pruning.compressed import write_compressed
from cps.pruning.engine import EngineResult, prune_model
from cps.pruning.masks import save_masks
from cps.pruning.quant import save_quant
from cps.runs import (
    DENSE_METRICS,
    ORIGINS,
    REMOVED_LAYERS_TAG,
    load_calibration_run,
    load_run_model,
    prune_params,
    run_masks,
)
from cps.stages.calibrate import calibration_dataset, run_calibrate
from cps.streaming import (
    ShardWriter,
    WeightReader,
    load,
    open_loaded,
    return_freed_memory,
    streamed,
    wants_stream,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    run_id: str
    stats: pl.DataFrame
    metrics: dict[str, float]
    calib: CalibrationSet | None
    model: LoadedModel | None = None  # the pruned model in memory, when asked for (keep_model)


Outcome = tuple[LoadedModel | None, pl.DataFrame, dict[str, float]]  # the model, layer stats, metrics


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def stats_frame(result: EngineResult) -> pl.DataFrame:
    """layer_stats.parquet: one row per pruned linear; sparsity measured on the stored weights."""
    rows = []
    for stat in result.stats:
        rows.append(
            {
                "layer": stat.layer,
                "module": stat.module,
                "calib_error": stat.error,
                "calib_signal": stat.signal,
                "calib_snr_db": stat.snr_db,
                "sparsity": stat.stored_sparsity,
                "mask_sparsity": stat.sparsity,
                "rows": stat.shape[0],
                "columns": stat.shape[1],
            }
        )
    return pl.DataFrame(rows)


def summary_metrics(stats: pl.DataFrame, seconds: float) -> dict[str, float]:
    finite = stats.filter(stats["calib_snr_db"].is_finite())
    weights = stats["rows"] * stats["columns"]
    return {
        "calib_snr_db.mean": float(finite["calib_snr_db"].mean()) if finite.height else math.inf,
        "calib_error.total": float(stats["calib_error"].sum()),
        "sparsity.actual": float((stats["sparsity"] * weights).sum() / weights.sum()),
        "time.prune_s": seconds,
        "mem.peak_rss_gb": peak_rss_gb(),
    }


def _calibration(
    config: PruneConfig, store: tracking.Store, tags: Mapping[str, str] | None
) -> tuple[CalibrationSet, str]:
    if config.calib_run:
        record = tracking.get_run(store, config.calib_run)
        if record.stage != "calibrate":
            raise CpsError(f"run {config.calib_run} is a {record.stage} run, not a calibrate run")
        if record.params.get("model") != config.model:
            raise CpsError(
                f"calibration run {config.calib_run} was tokenized for {record.params.get('model')!r}, "
                f"not {config.model!r}"
            )
        return load_calibration_run(store, config.calib_run), config.calib_run
    assert config.calibration is not None  # PruneConfig: a calibration or a calibrate run
    result = run_calibrate(config.calibration, store, tags)
    return result.calib, result.run_id


def run_prune(
    config: PruneConfig,
    store: tracking.Store,
    keep_model: bool = False,
    tags: Mapping[str, str] | None = None,
    then: Callable[[str, LoadedModel], object] | None = None,
) -> PruneResult:
    """The whole `cps prune`: calibration, pruning, and one tracked run with every artifact.

    With `keep_model` the pruned model comes back in memory (on the CPU). `then(run_id, model)` runs
    before the run ends (a sweep evaluates there), so the run is FINISHED only when it is done too.
    """
    tracking.client(store)  # an unreachable store fails before any work,
    placement(config.load_options)  # and so does a device this machine lacks,
    grid = config.grid if config.quantized else None
    if grid is not None and grid.group_size != -1:  # or a group size the model's widths refuse
        for width in sorted(linear_input_widths(config.model, config.load_options.trust_remote_code)):
            grid.width(width)
    source = _source_run(config, store)  # --from-run: the pruned run whose model is quantized
    calib, calib_run = (None, None) if config.dense else _calibration(config, store, tags)
    torch.manual_seed(calib.config.seed if calib else 0)
    params = prune_params(config, calib)
    if source is not None:  # what the model is: the source run's sparsity, pattern and variant
        params |= {key: source.params[key] for key in ("sparsity", "pattern")}
        params["from_method"] = run_variant(source.params)
    run_name = f"{run_variant(params)}-{config.model}-{params['calib_lang']}-{params['pattern']}"
    stream = not config.dense and wants_stream(config.model, config.load_options)
    if stream and source is not None:
        raise CpsError("--from-run quantizes the run's model in memory: use --no-stream")
    if stream and keep_model:
        raise CpsError("a streamed model is never whole in memory: keep_model needs --no-stream")
    if stream and config.save_model and method_class(config.method_name).removes_layers:
        raise CpsError(
            f"{config.method} saves its model with the layers taken out in memory: use --no-stream"
        )
    evaluated = then is not None  # evaluated next: the model with its tokenizer
    with (
        tracking.start_run(store, "prune", params, run_name, tags) as run,
        tempfile.TemporaryDirectory() as work,
    ):
        _log_inputs(run, calib, calib_run)
        if calib is None:
            loaded, stats, metrics = _dense_baseline(run, config, evaluated or keep_model)
        elif stream:
            loaded, stats, metrics = _prune_streamed(run, config, calib, Path(work), evaluated)
        else:
            loaded, stats, metrics = _prune_in_memory(run, config, calib, evaluated, source)
        describe(store, run.run_id)
        if then is not None:
            assert loaded is not None
            then(run.run_id, loaded)
    return PruneResult(run.run_id, stats, metrics, calib, loaded if keep_model else None)


def _source_run(config: PruneConfig, store: tracking.Store) -> tracking.RunRecord | None:
    """The finished prune run `--from-run` names, checked: pruned (not dense, not quantized), of
    the same model."""
    if config.from_run is None:
        return None
    record = tracking.get_run(store, config.from_run)
    if record.stage != "prune" or record.status != "FINISHED":
        raise CpsError(f"run {config.from_run} is not a finished prune run")
    if record.params.get("method") == DENSE or quant_label(record.params) is not None:
        raise CpsError(f"run {config.from_run} is not a pruned (unquantized) run: nothing to quantize around")
    if record.params.get("model") != config.model:
        raise CpsError(f"run {config.from_run} pruned {record.params.get('model')!r}, not {config.model!r}")
    return record


def _log_inputs(run: tracking.TrackedRun, calib: CalibrationSet | None, calib_run: str | None) -> None:
    if calib_run:
        run.set_tags({"cps.calib_run_id": calib_run})
    if calib is not None:
        tracking.log_datasets(run, [calibration_dataset(calib)])


def _dense_baseline(run: tracking.TrackedRun, config: PruneConfig, wanted: bool) -> Outcome:
    """The dense baseline prunes nothing: its metrics, and a model only for whoever asks for one
    (held on the CPU unless streamed, as a pruned model comes back; in the dtype of the device it
    computes on)."""
    metrics = {**DENSE_METRICS, "mem.peak_rss_gb": peak_rss_gb()}
    run.log_metrics(metrics)
    loaded = None
    if wanted:
        loaded = load(config.model, replace(config.load_options, hold_on_cpu=True))
        loaded.origin = ORIGINS["dense"]
    return loaded, pl.DataFrame(), metrics


def _prune_in_memory(
    run: tracking.TrackedRun,
    config: PruneConfig,
    calib: CalibrationSet,
    evaluated: bool,
    source: tracking.RunRecord | None = None,
) -> Outcome:
    """The model stays on the CPU, in the dtype of the device it computes on; the engine moves one
    layer at a time to that device. The tokenizer only once pruned, for a saved model or an
    evaluation next (the calibration set came by its fingerprint): not held through the pruning.
    With `source` (--from-run), the model is that run's, quantized around its masks."""
    options = replace(config.load_options, hold_on_cpu=True)
    plan = config.plan
    if source is not None:
        loaded = load_run_model(run.store, source, options, tokenizer=False)
        plan = replace(plan, held=run_masks(run.store, source.run_id))
    else:
        loaded = load_model(config.model, options, tokenizer=False)
    engine = replace(config.engine, device=placement(options).compute)
    if loaded.model.dtype != torch.float32 and engine.device == "cpu":
        log.info("pruning in %s on the CPU", loaded.model.dtype)
    method = get_method(config.method_name, config.options)
    result = prune_model(loaded.model, calib.input_ids, method, config.target, engine, plan=plan)
    if loaded.tokenizer is None and (config.save_model or evaluated):
        loaded.tokenizer = _tokenizer(config.model)
    loaded.origin = ORIGINS["pruned"]
    return loaded, *_log_outputs(run, config, loaded, result)


def _prune_streamed(
    run: tracking.TrackedRun, config: PruneConfig, calib: CalibrationSet, work: Path, evaluated: bool
) -> Outcome:
    """Prune layer by layer from the shards: each pruned layer is written to a shard as soon as it
    is done (`work/model`, a `from_pretrained` folder once closed). Returns the pruned model: the
    same skeleton, streamed from the dense shards with the pruned layers over them."""
    run.set_tags({"cps.streamed": True})
    forget_tokenizers()  # the calibration text is tokenized: its tokenizer's memory, and what
    return_freed_memory(collect=True)  # tokenizing it left behind, go to the layers
    folder = weights_folder(resolve_model(config.model))
    loaded = open_loaded(config.model, folder, config.load_options, tokenizer=False)
    source = streamed(loaded.model)
    assert source is not None
    writer = ShardWriter(work / "model")
    method = get_method(config.method_name, config.options)
    engine = replace(config.engine, device=placement(config.load_options).compute)

    def write_layer(index: int, layer: nn.Module) -> None:
        writer.write(source.layer_state(layer))

    result = prune_model(
        loaded.model, calib.input_ids, method, config.target, engine, write_layer, config.plan
    )
    _close_shards(writer, loaded.model, folder, config.save_model)
    # Every layer is released again: the same skeleton reads the pruned layers from now on. The
    # tokenizer (0.12 GB for Gemma-3, 0.45 GB while loading) only when the model is saved or evaluated next.
    source.use_overlay(WeightReader(work / "model"))
    if evaluated or config.save_model:
        loaded.tokenizer = _tokenizer(config.model, config.load_options.trust_remote_code)
    loaded.origin = ORIGINS["pruned"]
    return loaded, *_log_outputs(run, config, loaded, result, saved=work / "model")


def _close_shards(writer: ShardWriter, model: nn.Module, dense: Path, whole: bool) -> None:
    """Finish the folder of pruned shards: with `whole` (a saved model) the rest (embeddings, final
    norm, head) copied byte for byte from the dense shards; the config files; the model's class."""
    source = streamed(model)
    assert source is not None
    if whole:
        inside = {name for _, names in writer.shards for name in names}
        rest = [name for name, _ in model.named_parameters() if name not in inside]
        writer.copy(source.reader, {name: source.source_name(name) for name in rest})
    writer.close()
    for extra in ("config.json", "generation_config.json"):
        if (dense / extra).is_file():
            shutil.copyfile(dense / extra, writer.folder / extra)
    name_architecture(writer.folder / "config.json", model)


def _tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer once pruned: a load (none where this process holds it) between two
    hand-backs of freed memory, the pruning's blocks before it and its own parse after it (Gemma-3's
    peaks 0.45 GB above the 0.12 GB it keeps): the model is saved or evaluated next."""
    if tokenizer_loaded(name, trust_remote_code):
        return load_tokenizer(name, trust_remote_code)
    return_freed_memory(collect=True)
    tokenizer = load_tokenizer(name, trust_remote_code)
    return_freed_memory()
    return tokenizer


def _log_outputs(
    run: tracking.TrackedRun,
    config: PruneConfig,
    loaded: LoadedModel,
    result: EngineResult,
    saved: Path | None = None,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Metrics, series, layer stats, masks, the plot and (`save_model`) the weights: as an MLflow
    model from memory, or from the folder a streamed prune wrote (`saved`)."""
    stats = stats_frame(result)
    metrics = summary_metrics(stats, result.seconds)
    if result.quant:  # the stored zeros count weights that round to 0: the pruned share apart
        weights = stats["rows"] * stats["columns"]
        metrics["sparsity.mask"] = float((stats["mask_sparsity"] * weights).sum() / weights.sum())
    run.log_metrics(metrics)
    run.set_tags({"cps.calib_error_estimate": result.error_estimate})
    weights = pl.col("rows") * pl.col("columns")
    per_layer = (
        stats.group_by("layer")
        .agg(
            pl.col("calib_snr_db").filter(pl.col("calib_snr_db").is_finite()).mean(),
            pl.col("calib_error").sum(),
            ((pl.col("sparsity") * weights).sum() / weights.sum()).alias("sparsity"),
        )
        .sort("layer")
    )
    run.log_series("calib_snr_db.layer", per_layer["calib_snr_db"].fill_null(float("nan")).to_list())
    run.log_series("calib_error.layer", per_layer["calib_error"].to_list())
    run.log_series("sparsity.layer", per_layer["sparsity"].to_list())
    _log_layer_plan(run, result)
    run.log_frame(stats, "layer_stats.parquet")
    with tempfile.TemporaryDirectory() as folder:
        masks_path = Path(folder) / "masks.safetensors"
        save_masks(result.masks, str(masks_path))
        run.log_artifact(masks_path)
        if result.quant:  # each quantized linear's grid and integer codes
            reader = WeightReader(saved) if saved is not None else None

            def weight_of(name: str) -> torch.Tensor:
                if reader is not None:
                    return reader.read(f"{name}.weight")
                return loaded.model.get_submodule(name).weight.data

            save_quant(str(Path(folder) / "quant.safetensors"), result.quant, weight_of)
            run.log_artifact(Path(folder) / "quant.safetensors")
        from cps.analysis.plots import calib_snr_per_layer  # matplotlib: only once the work is done

        figure = calib_snr_per_layer(
            stats, f"in-sample SNR: {config.method_name} {config.target.pattern} — {config.model}"
        )
        (Path(folder) / "plots").mkdir()
        figure.savefig(Path(folder) / "plots" / "calib_snr_per_layer.png", dpi=120)
        run.log_artifact(Path(folder) / "plots", "plots")
        if config.save_model and saved is not None:
            loaded.tokenizer.save_pretrained(saved)
        if config.save_model and result.quant:  # as compressed-tensors: transformers and vLLM load it
            saved = _compressed_copy(loaded, result, saved, Path(folder) / "compressed")
        if config.save_model:  # a layer-removal run's model without its removed layers
            with without_layers(loaded.model, result.removed_layers or []):
                tracking.log_transformers_model(run, loaded.model, loaded.tokenizer, checkpoint=saved)
    return stats, metrics


def _compressed_copy(loaded: LoadedModel, result: EngineResult, saved: Path | None, folder: Path) -> Path:
    """A quantized model's compressed-tensors checkpoint in `folder`: the model in memory saved
    there, or a streamed run's shard folder copied (the run's model still reads those shards), and
    then each quantized linear's weight stored as its packed codes, scales and zero points."""
    if saved is not None:
        shutil.copytree(saved, folder)
    else:
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    write_compressed(folder, result.quant)
    return folder


def _log_layer_plan(run: tracking.TrackedRun, result: EngineResult) -> None:
    """What decided each layer's share: OWL's outlier ratios and allocated sparsities, or layer
    removal's Block Influence and the layers it removed."""
    if result.outlier_ratios is not None and result.layer_targets is not None:
        run.log_series("owl.outlier_ratio.layer", result.outlier_ratios)
        run.log_series("owl.sparsity_target.layer", result.layer_targets)
    if result.block_influence is not None and result.removed_layers is not None:
        run.log_series("block_influence.layer", result.block_influence)
        run.log_metrics({"layers.removed": float(len(result.removed_layers))})
        run.set_tags({REMOVED_LAYERS_TAG: json.dumps(result.removed_layers)})
