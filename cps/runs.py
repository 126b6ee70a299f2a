"""Prune runs in the store, and back into things in memory.

- what a prune run logs as params (`prune_params`), and the dense baseline's run of a model,
  created without loading the model when there is none (`dense_run`);
- its masks, per-linear layer stats and calibration set;
- its model: the saved `model/` artifact; else the dense weights with the masks applied (methods
  that keep the dense weights); else weights kept in the local cache by a sweep; else pruned again
  from the same calibration run and checked mask for mask (methods that update the weights).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from cps import tracking
from cps.config import DENSE, PruneConfig, quant_label, same_quantization, updates_weights
from cps.data.calibration import CalibrationSet, load_calibration
from cps.errors import CpsError
from cps.models import (
    LoadedModel,
    LoadOptions,
    check_shapes,
    decoder_layers,
    load_model,
    load_tokenizer,
    model_id,
    placement,
    pretrained,
    resolve_model,
    weights_folder,
)
from cps.paths import cache_dir, publish, staging
from cps.pruning.base import get_method, method_class
from cps.pruning.compressed import dequantize_now, load_kwargs, quantized_config
from cps.pruning.engine import prune_model
from cps.pruning.masks import load_masks
from cps.pruning.quant import QuantParams, load_quant
from cps.streaming import (
    ShardWriter,
    WeightReader,
    copy_tensors,
    load,
    open_loaded,
    streamed,
    wants_stream,
)

log = logging.getLogger(__name__)

CALIBRATION_ARTIFACT = "calibration.safetensors"
# layer_stats.parquet columns before the in-sample figures were named for what they are
_LEGACY_LAYER_STATS = {"error": "calib_error", "signal": "calib_signal", "snr_db": "calib_snr_db"}
DENSE_METRICS = {"sparsity.actual": 0.0, "time.prune_s": 0.0}  # a dense baseline prunes nothing


# ---------------------------------------------------------------------------------------------
# Params and the dense baseline's run


def prune_params(config: PruneConfig, calib: CalibrationSet | None) -> dict[str, object]:
    """The DESIGN.md params of a prune run: its identity plus the model's id and the data's hash."""
    params = config.identity(calib.config if calib else None)
    params["model_id"] = model_id(resolve_model(config.model))
    params["calib_hash"] = calib.calib_hash if calib else "none"
    return params


def dense_run(store: tracking.Store, model: str, dtype: str) -> str:
    """The `method=dense` run of this model in `dtype` (resolved, as runs log it), created (without
    loading anything) when there is none."""
    config = PruneConfig(model, method=None, dtype=dtype)
    wanted = {"method": DENSE, "model": model, "model_id": model_id(resolve_model(model)), "dtype": dtype}
    existing = find_prune_runs(store, wanted)
    if existing:
        return existing[0].run_id
    with tracking.start_run(store, "prune", prune_params(config, None), f"dense-{model}") as run:
        run.log_metrics(DENSE_METRICS)
    return run.run_id


def find_prune_runs(
    store: tracking.Store, params: Mapping[str, Any], status: str | None = "FINISHED"
) -> list[tracking.RunRecord]:
    """Prune runs with these params (`tracking.find_runs`), newest first; a run logged before issue
    25, with `dtype=auto`, matches the dtype it pruned in (`pruned_dtype`), and one logged before
    issue 26, without `allocation` and `refine`, matches uniform and none: stores made before find
    their finished cells and dense runs."""
    if _BEFORE_ALLOCATIONS.items() <= {k: str(v) for k, v in params.items()}.items():
        # a run from before issue 26 logged neither param: it was uniform and unrefined
        plain = {k: v for k, v in params.items() if k not in _BEFORE_ALLOCATIONS}
        found = _find_by_dtype(store, params, status)
        found += [r for r in _find_by_dtype(store, plain, status) if "allocation" not in r.params]
        found = sorted(found, key=lambda record: record.start_time, reverse=True)
    else:
        found = _find_by_dtype(store, params, status)
    return [record for record in found if same_quantization(params, record.params)]


_BEFORE_ALLOCATIONS = {"allocation": "uniform", "refine": "none"}


def _find_by_dtype(
    store: tracking.Store, params: Mapping[str, Any], status: str | None
) -> list[tracking.RunRecord]:
    found = tracking.find_runs(store, "prune", params, status)
    dtype = params.get("dtype")
    if dtype is None or dtype == "auto":
        return found
    legacy = tracking.find_runs(store, "prune", {**params, "dtype": "auto"}, status)
    found += [record for record in legacy if pruned_dtype(record) == dtype]
    return sorted(found, key=lambda record: record.start_time, reverse=True)


def pruned_dtype(record: tracking.RunRecord) -> str:
    """The dtype a prune run pruned in: its `dtype` param, resolved since issue 25. Runs from before
    logged `auto` as given: pruned in memory, that was float32 (the model was loaded on the CPU and
    `auto` resolved there); streamed, it depended on a device the run did not record (`auto` stays)."""
    dtype = record.params.get("dtype", "auto")
    if dtype == "auto" and record.tags.get("cps.streamed") != "True":
        return "float32"
    return dtype


# ---------------------------------------------------------------------------------------------
# Artifacts


def run_masks(store: tracking.Store, run_id: str) -> dict[str, torch.Tensor]:
    """The pruning masks a prune run saved (`masks.safetensors`), True = pruned."""
    with tempfile.TemporaryDirectory() as folder:
        return load_masks(str(tracking.download_artifact(store, run_id, "masks.safetensors", folder)))


def run_quant(store: tracking.Store, run_id: str) -> dict[str, tuple[QuantParams, torch.Tensor]]:
    """A quantized run's grid and integer codes per linear (`quant.safetensors`); CpsError where
    it logged none."""
    with tempfile.TemporaryDirectory() as folder:
        return load_quant(str(tracking.download_artifact(store, run_id, "quant.safetensors", folder)))


def run_codes(store: tracking.Store, run_id: str) -> dict[str, torch.Tensor]:
    """A quantized run's integer codes per linear, int8 (out, in)."""
    return {name: codes for name, (_, codes) in run_quant(store, run_id).items()}


def run_layer_stats(store: tracking.Store, run_id: str) -> pl.DataFrame:
    """A prune run's `layer_stats.parquet` (in-sample: on its own calibration tokens)."""
    with tempfile.TemporaryDirectory() as folder:
        stats = pl.read_parquet(tracking.download_artifact(store, run_id, "layer_stats.parquet", folder))
    return stats.rename({k: v for k, v in _LEGACY_LAYER_STATS.items() if k in stats.columns})


def run_series(store: tracking.Store, run_id: str, key: str) -> list[float]:
    """A per-layer series a prune run logged (`owl.sparsity_target.layer`: one value per decoder
    layer, in layer order); CpsError when the run has none."""
    values = tracking.metric_history(store, run_id, key)
    if not values:
        raise CpsError(f"run {run_id} logged no series {key!r}")
    return values


def load_calibration_run(store: tracking.Store, run_id: str) -> CalibrationSet:
    """The calibration set recorded by a calibrate run (`--calib RUN_ID`)."""
    with tempfile.TemporaryDirectory() as folder:
        path = tracking.download_artifact(store, run_id, CALIBRATION_ARTIFACT, folder)
        calib = load_calibration(path)
    calib.cache_path = Path(f"runs:/{run_id}/{CALIBRATION_ARTIFACT}")
    return calib


# ---------------------------------------------------------------------------------------------
# Weights kept by a sweep: a sweep that analyses activations keeps the weights of methods that
# update them (SparseGPT) in the local cache until its analyses are done, so they need not be
# pruned again; never an artifact.


def kept_weights_path(run_id: str) -> Path:
    return cache_dir() / "pruned" / f"{run_id}.safetensors"


def _linear_weights(model: torch.nn.Module) -> list[str]:
    """Parameter names of the linear weights inside the decoder layers: what a kept file holds."""
    layers = {id(layer) for layer in decoder_layers(model)}
    return [
        f"{name}.{inner}.weight"
        for name, layer in model.named_modules()
        if id(layer) in layers
        for inner, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]


def keep_weights(run_id: str, model: torch.nn.Module) -> Path:
    """Save the decoder layers' linear weights of a pruned model to the local cache (atomically),
    under their parameter names; a streamed model's are copied from its pruned shards, never held
    at once."""
    built = staging(kept_weights_path(run_id))
    source = streamed(model)
    if source is not None and source.overlay is not None:
        copy_tensors(source.overlay, {name: name for name in _linear_weights(model)}, built)
    else:
        state = {
            name: model.get_parameter(name).detach().to("cpu").contiguous() for name in _linear_weights(model)
        }
        save_file(state, str(built))
    return publish(built, kept_weights_path(run_id))


def drop_kept_weights(run_ids: list[str]) -> None:
    for run_id in run_ids:
        kept_weights_path(run_id).unlink(missing_ok=True)
        shutil.rmtree(kept_weights_path(run_id).with_suffix(".layers"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The model of a run


def load_run_model(
    store: tracking.Store, record: tracking.RunRecord, options: LoadOptions, tokenizer: bool = True
) -> LoadedModel:
    """The weights a prune run produced, as a model in memory. A streamed model, or the dense one,
    comes without its tokenizer unless `tokenizer` (a pruned model rebuilt in memory always has it)."""
    params = record.params
    if params.get("method") == DENSE:
        return replace(load(params["model"], options, tokenizer), origin=ORIGINS["dense"])
    stream = wants_stream(params["model"], options)
    if REMOVED_LAYERS_TAG in record.tags:  # its saved model lacks layers; dense x masks keeps the
        # stack (removed layers zeroed: the identity), so per-layer statistics line up with the dense
        return (
            _streamed_run_model(store, record, options, tokenizer)
            if stream
            else _rebuild(store, record, options)
        )
    with tempfile.TemporaryDirectory() as scratch:
        # A streamed model reads its shards while it lives: a downloaded copy goes to the cache.
        where = cache_dir() / "downloads" / record.run_id if stream else Path(scratch)
        saved = tracking.logged_model_folder(store, record.run_id, where)
        # earlier cps versions (and streamed runs before issue 23): a plain `model/` artifact
        if saved is None:
            saved = tracking.artifact_if_any(store, record.run_id, "model", where)
        if saved is not None and _misnamed_embedding(store, record, saved):
            saved = None
        if saved is not None and stream and quantized_config(saved) is not None:
            # streaming reads dense tensors by name; a compressed-tensors folder has packed codes
            log.info("run %s: its saved model is compressed; streaming it as rebuilt instead", record.run_id)
            saved = None
        if saved is not None and stream:
            loaded = open_loaded(params["model"], saved, options, tokenizer)
            return replace(loaded, origin=ORIGINS["saved"])
        if saved is not None:
            return _load_saved(record, options, saved)
    if stream:
        return _streamed_run_model(store, record, options, tokenizer)
    if kept_weights_path(record.run_id).is_file():
        return _load_kept(store, record, options)
    return _rebuild(store, record, options)


# Where `load_run_model` took a run's weights from (`LoadedModel.origin`; `cps eval` tags it).
ORIGINS = {
    "dense": "the dense checkpoint",
    "saved": "the run's saved model",
    "kept": "weights kept by a sweep",
    "masks": "the dense checkpoint x the run's masks",
    "pruned_again": "pruned again from the run's calibration set",
    "pruned": "pruned in this process",
}
SAVED_MODEL_TAG = "cps.saved_model"  # set on a prune run whose saved model cannot be used
REMOVED_LAYERS_TAG = "cps.removed_layers"  # a layer-removal run: the removed decoder layers (JSON)


def _misnamed_embedding(store: tracking.Store, record: tracking.RunRecord, folder: Path) -> bool:
    """Whether the run's saved model is one that cps wrote before issue 23: its embedding stored
    under the text of a key mapping's pattern (`lm_head.weight$`), so that every loader leaves the
    embedding and the head random. Says so in one line and tags the run; the caller rebuilds it."""
    names = [name for path in sorted(folder.glob("*.safetensors")) for name in WeightReader(path).entries]
    misnamed = [name for name in names if any(char in name for char in "$^\\")]
    if not misnamed:
        return False
    instead = (
        "pruned again from its calibration run"
        if updates_weights(record.params)
        else "rebuilt from the dense model and its masks"
    )
    log.warning(
        "run %s: its saved model stores the embedding under %r (cps before issue 23), so any loader "
        "would leave the embedding and head random; evaluating the run %s instead",
        record.run_id,
        misnamed[0],
        instead,
    )
    reason = f"unusable: embedding saved under {misnamed[0]!r} (written before cps fixed issue 23)"
    if record.tags.get(SAVED_MODEL_TAG) != reason:
        tracking.open_run(store, record.run_id).set_tags({SAVED_MODEL_TAG: reason})
    return True


def _streamed_run_model(
    store: tracking.Store, record: tracking.RunRecord, options: LoadOptions, tokenizer: bool
) -> LoadedModel:
    """The run's weights streamed: the dense shards with the kept weights over them, or with the
    masks applied as each weight is read, or (a method that updates the weights) with the layers
    pruned again over them (`_pruned_again_shards`)."""
    params = record.params
    kept = kept_weights_path(record.run_id)
    masks = None if kept.is_file() else run_masks(store, record.run_id)
    updates = masks is not None and updates_weights(params)
    pruned_again = _pruned_again_shards(store, record, options, masks) if updates else None
    dense = weights_folder(resolve_model(params["model"]))
    loaded = open_loaded(params["model"], dense, options, tokenizer)
    source = streamed(loaded.model)
    assert source is not None
    if masks is None:
        source.use_overlay(WeightReader(kept))
        return replace(loaded, origin=ORIGINS["kept"])
    if pruned_again is not None:
        source.use_overlay(WeightReader(pruned_again))
        return replace(loaded, origin=ORIGINS["pruned_again"])
    _check_masks(record, masks, loaded.model)
    source.overrides = {f"{name}.weight": partial(_masked, mask=mask) for name, mask in masks.items()}
    return replace(loaded, origin=ORIGINS["masks"])


def _pruned_again_shards(
    store: tracking.Store, record: tracking.RunRecord, options: LoadOptions, masks: dict[str, torch.Tensor]
) -> Path:
    """The layers of a run whose method updates the weights, pruned again layer by layer into
    shards of the cache (once), in the dtype the run pruned in whatever the evaluation's: read
    over the dense shards, they are converted to the evaluation's dtype like any checkpoint."""
    folder = cache_dir() / "pruned" / f"{record.run_id}.layers"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    if record.params.get("from_run"):
        raise CpsError(
            f"run {record.run_id} quantized run {record.params['from_run']}'s model: "
            "evaluate it with --no-stream"
        )
    again = replace(options, dtype=pruned_dtype(record))
    name = record.params["model"]
    loaded = open_loaded(name, weights_folder(resolve_model(name)), again, tokenizer=False)
    source = streamed(loaded.model)
    assert source is not None
    writer = ShardWriter(staging(folder))

    def write_layer(index: int, layer: torch.nn.Module) -> None:
        writer.write(source.layer_state(layer))

    _prune_again(store, record, loaded, masks, placement(again).compute, write_layer)
    writer.close()
    return publish(writer.folder, folder)


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.mul_(~mask.to(weight.device))


def _load_saved(record: tracking.RunRecord, options: LoadOptions, folder: Path) -> LoadedModel:

    where = placement(options)
    what = f"run {record.run_id}'s saved model ({folder})"
    model = pretrained(what, folder, dtype=where.dtype, **load_kwargs(folder))
    if quantized_config(folder) is not None:
        dequantize_now(model)  # dense linears from here on, as every reader of the model expects
    # The tokenizer of the source model, exactly as pruning used it: a copy reloaded beside another
    # architecture's config can come back as that architecture's tokenizer class.
    tokenizer = load_tokenizer(record.params["model"], options.trust_remote_code)
    model.eval().to(where.device)
    return LoadedModel(resolve_model(record.params["model"]), model, tokenizer, ORIGINS["saved"])


def _load_kept(store: tracking.Store, record: tracking.RunRecord, options: LoadOptions) -> LoadedModel:
    masks = run_masks(store, record.run_id)
    loaded = load_model(record.params["model"], options)
    state = load_file(str(kept_weights_path(record.run_id)))
    expected = {name: loaded.model.get_parameter(name).shape for name in _linear_weights(loaded.model)}
    check_shapes(
        f"the weights kept for run {record.run_id} ({kept_weights_path(record.run_id)})",
        {name: weight.shape for name, weight in state.items()},
        expected,
        expected.keys() - state.keys(),
    )
    with torch.no_grad():
        for name, weight in state.items():
            target, module = loaded.model.get_parameter(name), name.removesuffix(".weight")
            if module in masks and bool((weight[masks[module]] != 0).any()):
                raise CpsError(f"kept weights of run {record.run_id} disagree with its masks ({module})")
            target.copy_(weight.to(target.dtype))
    return replace(loaded, origin=ORIGINS["kept"])


def _rebuild(store: tracking.Store, record: tracking.RunRecord, options: LoadOptions) -> LoadedModel:
    masks = run_masks(store, record.run_id)
    if updates_weights(record.params):
        return _rebuild_pruned_again(store, record, options, masks)
    loaded = load_model(record.params["model"], options)  # the dense weights, masked
    _check_masks(record, masks, loaded.model)
    with torch.no_grad():
        for name, mask in masks.items():
            loaded.model.get_submodule(name).weight.mul_(~mask.to(loaded.model.device))
    return replace(loaded, origin=ORIGINS["masks"])


def _rebuild_pruned_again(
    store: tracking.Store, record: tracking.RunRecord, options: LoadOptions, masks: dict[str, torch.Tensor]
) -> LoadedModel:
    """Pruned again as `cps prune` pruned it: in the run's dtype, held on the CPU, each layer
    computed on the evaluation's device; then placed as the run's saved model would be loaded."""
    again = replace(options, dtype=pruned_dtype(record), hold_on_cpu=True)
    source = record.params.get("from_run")  # --from-run: the pruned run's model, quantized again
    if source:
        loaded = load_run_model(store, tracking.get_run(store, source), again)
    else:
        loaded = load_model(record.params["model"], again)
    _prune_again(store, record, loaded, masks, placement(again).compute)
    where = placement(options)
    if where.dtype == loaded.model.dtype:
        loaded.model.to(where.device)
        return replace(loaded, origin=ORIGINS["pruned_again"])
    # Evaluated in another dtype: the pruned model's weights cast into a load in that dtype, as its
    # saved weights would load; the buffers (rotary frequencies, which a bfloat16 load keeps in
    # float32) are that load's own, not the pruned model's cast.
    placed = load_model(record.params["model"], options)
    pruned = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, target in placed.model.named_parameters():
            target.copy_(pruned[name].to(target.dtype))
    return replace(placed, origin=ORIGINS["pruned_again"])


def _check_masks(record: tracking.RunRecord, masks: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every mask names a linear of the model, of its weight's shape."""
    check_shapes(
        f"the masks of run {record.run_id}",
        {name: mask.shape for name, mask in masks.items()},
        {name.removesuffix(".weight"): parameter.shape for name, parameter in model.named_parameters()},
    )


def _prune_again(
    store: tracking.Store,
    record: tracking.RunRecord,
    loaded: LoadedModel,
    masks: dict[str, torch.Tensor],
    device: str,
    on_layer: Callable[[int, torch.nn.Module], None] | None = None,
) -> LoadedModel:
    """A method that updates the weights: prune again (deterministic; each layer computed on
    `device`), check the masks agree."""
    params = record.params
    calib_run = record.tags.get("cps.calib_run_id")
    if not calib_run:
        raise CpsError(f"run {record.run_id} saved no model and names no calibration run to rebuild it")
    log.warning("run %s saved no model: pruning again with %s to rebuild it", record.run_id, params["method"])
    calib = load_calibration_run(store, calib_run)
    # every setting the run logged (the method's options, its allocation, refinement and
    # quantization); the dtype it pruned in (a quantized run's scales are fitted in it)
    fields = {f.name for f in dataclasses.fields(PruneConfig)} - set(_REBUILT_HERE)
    quantizes = method_class(params["method"]).quantizes
    options = {name: _param(value) for name, value in params.items() if name in fields}
    config = PruneConfig(
        params["model"],
        params["method"],
        # the calibrate run's file may name another model with the same tokenizer
        calibration=replace(calib.config, model=params["model"]),
        # (a quantization method's pattern and sparsity are its model's: a --from-run source's)
        pattern="unstructured" if quantizes else params["pattern"],
        sparsity=None if quantizes or ":" in params["pattern"] else float(params["sparsity"]),
        device=device,
        dtype=pruned_dtype(record),
        **options,
    )
    stored = _stored_quant(store, record)
    names = {id(module): name for name, module in loaded.model.named_modules()}

    def checked(index: int, layer: torch.nn.Module) -> None:
        """A quantized layer rebuilt holds the codes the run logged (same grid, same rounding)."""
        for module in layer.modules():
            name = names.get(id(module))
            if stored and name in stored:
                params_, codes = stored[name]
                if not torch.equal(params_.codes(module.weight.data), codes):
                    raise CpsError(
                        f"rebuilding run {record.run_id} gave other quantization codes ({name}); "
                        "cannot evaluate it faithfully"
                    )
        if on_layer is not None:
            on_layer(index, layer)

    method = get_method(config.method_name, config.options)
    plan = config.plan
    if config.from_run is not None:  # quantized around the pruned run's masks, as it was
        plan = replace(plan, held=run_masks(store, config.from_run))
    result = prune_model(loaded.model, calib.input_ids, method, config.target, config.engine, checked, plan)
    if result.masks.keys() != masks.keys() or any(not torch.equal(result.masks[k], masks[k]) for k in masks):
        raise CpsError(f"rebuilding run {record.run_id} gave different masks; cannot evaluate it faithfully")
    return loaded


_REBUILT_HERE = (
    "model",
    "method",
    "calibration",
    "pattern",
    "sparsity",
    "device",
    "dtype",
)


def _stored_quant(store: tracking.Store, record: tracking.RunRecord) -> dict | None:
    """A quantized run's logged grid and codes per linear (None unquantized, or logged before
    issue 27's artifact)."""
    if quant_label(record.params) is None:
        return None
    try:
        return run_quant(store, record.run_id)
    except CpsError:
        return None


def _param(value: str) -> object:
    """A logged param back as the value it was (MLflow keeps strings): True/False, None, a number,
    else the string."""
    if value in ("True", "False"):
        return value == "True"
    if value == "None":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
