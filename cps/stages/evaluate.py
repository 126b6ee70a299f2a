"""`cps eval`: perplexity per language and zero-shot tasks, logged into the evaluated model's run.

A prune run is evaluated with its pruned weights: the `model/` artifact when it was saved, else the
dense model rebuilt with the saved masks (Wanda, magnitude) or pruned again from the same
calibration set and checked against the saved masks (SparseGPT, whose weights are updated).
`--model` alone evaluates the dense model into its `method=dense` run, reused when one exists.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cps import tracking
from cps.data import get_corpus
from cps.data.calibration import CalibrationConfig
from cps.errors import CpsError
from cps.evaluation.hidden import DenseStates, SnrMeter, StateRecorder, reference_plan, save_reference
from cps.evaluation.perplexity import score_text
from cps.evaluation.tasks import expand_tasks, run_tasks, task_configs
from cps.evaluation.windows import (
    PROTOCOL_VERSION,
    HeldOutText,
    default_stride,
    held_out_windows,
    prefix_label,
    protocol,
)
from cps.languages import PAPER_LANGUAGES, get_language
from cps.metrics import companion, layer_series, metric, split_task
from cps.models import (
    LoadedModel,
    LoadOptions,
    decoder_layers,
    load_model,
    load_tokenizer,
    model_id,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from cps.pruning.masks import load_masks

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    run_id: str | None = None
    model: str | None = None
    langs: tuple[str, ...] = PAPER_LANGUAGES
    tasks: tuple[str, ...] = ()
    corpus: str = "flores"
    seqlen: int = 1024  # tokens per held-out window, BOS included
    stride: int | None = None  # window step inside a long document (default seqlen // 2)
    limit: float | None = None  # tasks: items per task (or a fraction)
    max_documents: int | None = None  # perplexity: the first N held-out documents per language
    task_limits: tuple[tuple[str, float], ...] = ()  # per family or task, overriding `limit`
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.run_id is None) == (self.model is None):
            raise CpsError("give a run id to evaluate, or --model for the dense baseline (not both)")
        for lang in self.langs:
            get_language(lang)
        if self.seqlen < 2:
            raise CpsError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.stride is not None and not 1 <= self.stride < self.seqlen:
            raise CpsError(f"--stride must be between 1 and --seqlen - 1 (got {self.stride})")
        if self.max_documents is not None and self.max_documents < 1:
            raise CpsError(f"--max-docs must be positive (got {self.max_documents})")
        if self.limit is not None and self.limit <= 0:
            raise CpsError(f"--limit must be positive (got {self.limit:g})")
        for name, value in self.task_limits:
            if not isinstance(value, int | float) or value <= 0:
                raise CpsError(f"the item limit for {name!r} must be a positive number (got {value!r})")
        if self.batch_size < 1:
            raise CpsError(f"--batch-size must be positive (got {self.batch_size})")
        if self.model is not None:
            resolve_model(self.model)
        LoadOptions(self.dtype, self.device)

    def limit_for(self, task: str) -> float | None:
        """Items to score for `task`: its own limit, its family's, else `limit`."""
        limits = dict(self.task_limits)
        return limits.get(task, limits.get(split_task(task)[0], self.limit))


EVAL_FINGERPRINT_TAG = "cps.eval.fingerprint"


def eval_fingerprint(config: EvalConfig) -> str:
    """What was measured (not where): a sweep's cell is complete when its run carries this."""
    import hashlib
    import json

    what = {
        "langs": sorted(config.langs),
        "tasks": sorted(config.tasks),
        "corpus": config.corpus,
        "seqlen": config.seqlen,
        "stride": config.stride or default_stride(config.seqlen),
        "protocol": PROTOCOL_VERSION,  # a new protocol re-evaluates old runs instead of mixing them
        "limit": config.limit,
        "task_limits": sorted(config.task_limits),
        "max_documents": config.max_documents,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalResult:
    run_id: str
    scores: pl.DataFrame  # long: name (lang or task), metric, value, stderr, ci_low, ci_high
    metrics: dict[str, float]
    items: dict[str, pl.DataFrame]  # artifact name (items/...) -> per-document or per-item results


# ---------------------------------------------------------------------------------------------
# Which run, which weights


def dense_run(store: tracking.Store, model: str, dtype: str) -> str:
    """The `method=dense` run of this model, created when there is none yet."""
    from cps.stages.prune import PruneConfig, run_prune

    wanted = {"method": "dense", "model": model, "model_id": model_id(resolve_model(model)), "dtype": dtype}
    existing = tracking.find_runs(store, "prune", wanted)
    if existing:
        return existing[0].run_id
    return run_prune(PruneConfig(CalibrationConfig(model, "en"), "dense", dtype=dtype), store).run_id


MASK_ONLY_METHODS = ("wanda", "magnitude")  # the kept weights stay the dense ones


def load_run_model(store: tracking.Store, record: tracking.RunRecord, options: LoadOptions) -> LoadedModel:
    """The weights a prune run produced, as a model in memory."""
    params = record.params
    if params.get("method") == "dense":
        return load_model(params["model"], options)
    local = tracking.local_artifact_dir(store, record.run_id, "model")
    if local is not None or _has_artifact(store, record.run_id, "model"):
        return _load_saved(store, record, options, local)
    if kept_weights_path(record.run_id).is_file():
        return _load_kept(store, record, options)
    return _rebuild(store, record, options)


# A sweep that analyses activations keeps the weights of methods that update them (SparseGPT) in
# the local cache until its analyses are done, so they need not be pruned again; never an artifact.


def kept_weights_path(run_id: str) -> Path:
    from cps.paths import cache_dir

    return cache_dir() / "pruned" / f"{run_id}.safetensors"


def keep_weights(run_id: str, model: torch.nn.Module) -> Path:
    """Save the decoder layers' linear weights of a pruned model to the local cache (atomically)."""
    from safetensors.torch import save_file

    from cps.models import decoder_layers

    layers = {id(layer) for layer in decoder_layers(model)}
    state = {
        f"{name}.{inner}": module.weight.detach().to("cpu").contiguous()
        for name, layer in model.named_modules()
        if id(layer) in layers
        for inner, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    path = kept_weights_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(path)
    return path


def drop_kept_weights(run_ids: list[str]) -> None:
    for run_id in run_ids:
        kept_weights_path(run_id).unlink(missing_ok=True)


def run_masks(store: tracking.Store, run_id: str) -> dict[str, torch.Tensor]:
    """The pruning masks a prune run saved (`masks.safetensors`), True = pruned."""
    with tempfile.TemporaryDirectory() as folder:
        return load_masks(str(tracking.download_artifact(store, run_id, "masks.safetensors", folder)))


def _load_kept(store: tracking.Store, record: tracking.RunRecord, options: LoadOptions) -> LoadedModel:
    from safetensors.torch import load_file

    masks = run_masks(store, record.run_id)
    loaded = load_model(record.params["model"], options)
    state = load_file(str(kept_weights_path(record.run_id)))
    with torch.no_grad():
        for name, weight in state.items():
            target = loaded.model.get_submodule(name).weight
            if name in masks and bool((weight[masks[name]] != 0).any()):
                raise CpsError(f"kept weights of run {record.run_id} disagree with its masks ({name})")
            target.copy_(weight.to(target.dtype))
    return loaded


def _has_artifact(store: tracking.Store, run_id: str, path: str) -> bool:
    return any(item.path == path for item in tracking.client(store).list_artifacts(run_id))


def _load_saved(
    store: tracking.Store, record: tracking.RunRecord, options: LoadOptions, local: Path | None
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    device = resolve_device(options.device)
    with tempfile.TemporaryDirectory() as folder:
        path = local or tracking.download_artifact(store, record.run_id, "model", folder)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(options.dtype, device))
    # The tokenizer of the source model, exactly as pruning used it: a copy reloaded beside another
    # architecture's config can come back as that architecture's tokenizer class.
    tokenizer = load_tokenizer(record.params["model"], options.trust_remote_code)
    model.eval().to(device)
    return LoadedModel(resolve_model(record.params["model"]), model, tokenizer)


def _rebuild(store: tracking.Store, record: tracking.RunRecord, options: LoadOptions) -> LoadedModel:
    masks = run_masks(store, record.run_id)
    loaded = load_model(record.params["model"], options)
    if record.params["method"] in MASK_ONLY_METHODS:  # weights are the dense ones, masked
        with torch.no_grad():
            for name, mask in masks.items():
                loaded.model.get_submodule(name).weight.mul_(~mask.to(loaded.model.device))
        return loaded
    return _prune_again(store, record, loaded, masks)


def _prune_again(
    store: tracking.Store, record: tracking.RunRecord, loaded: LoadedModel, masks: dict[str, torch.Tensor]
) -> LoadedModel:
    """SparseGPT changes the kept weights: prune again (deterministic) and check the masks agree."""
    from cps.pruning.base import MethodOptions, get_method
    from cps.pruning.engine import EngineConfig, prune_model
    from cps.pruning.masks import SparsityTarget
    from cps.stages.calibrate import load_calibration_run

    params = record.params
    calib_run = record.tags.get("cps.calib_run_id")
    if not calib_run:
        raise CpsError(f"run {record.run_id} saved no model and names no calibration run to rebuild it")
    log.warning("run %s saved no model: pruning again with %s to rebuild it", record.run_id, params["method"])
    calib = load_calibration_run(store, calib_run)
    pattern = params["pattern"]
    target = SparsityTarget.parse(pattern, None if ":" in pattern else float(params["sparsity"]))
    options = MethodOptions(int(params.get("blocksize", 128)), float(params.get("dampening", 0.01)))
    engine = EngineConfig(
        device=str(loaded.model.device), true_sequential=params.get("true_sequential") == "True"
    )
    result = prune_model(loaded.model, calib.input_ids, get_method(params["method"], options), target, engine)
    if result.masks.keys() != masks.keys() or any(not torch.equal(result.masks[k], masks[k]) for k in masks):
        raise CpsError(f"rebuilding run {record.run_id} gave different masks; cannot evaluate it faithfully")
    return loaded


# ---------------------------------------------------------------------------------------------
# The stage


def run_eval(config: EvalConfig, store: tracking.Store, loaded: LoadedModel | None = None) -> EvalResult:
    """Scores of the run's model (`loaded` when the caller already holds it) logged into the run."""
    import json

    import polars as pl

    tracking.client(store)
    # Everything a user can get wrong fails here, before a model is loaded.
    corpus = get_corpus(config.corpus, config.data_dir)
    langs = [corpus.require(lang) for lang in config.langs]
    task_names = expand_tasks(list(config.tasks), langs, config.data_dir)
    task_configs(task_names, config.data_dir)
    if config.run_id is not None:
        record = tracking.get_run(store, config.run_id)
        if record.stage != "prune":
            raise CpsError(f"run {config.run_id} is a {record.stage} run; evaluate prune runs (or --model)")
        run_id = config.run_id
    else:
        run_id = dense_run(store, str(config.model), config.dtype)
        record = tracking.get_run(store, run_id)
    options = LoadOptions(config.dtype, config.device)
    if loaded is None:
        loaded = load_run_model(store, record, options)
    else:
        loaded.model.to(resolve_device(config.device))
    texts = {
        lang: held_out_windows(
            corpus.documents(lang)[: config.max_documents], loaded.tokenizer, config.seqlen, config.stride
        )
        for lang in langs
    }
    held_out = held_out_scores(loaded, record, texts, options)
    rows, metrics, items = held_out.rows, held_out.metrics, held_out.items
    by_limit: dict[float | None, list[str]] = {}
    for name in task_names:
        by_limit.setdefault(config.limit_for(name), []).append(name)
    for limit, names in by_limit.items():
        results = run_tasks(loaded.model, loaded.tokenizer, names, config.data_dir, limit, config.batch_size)
        for score in results.scores:
            rows.append((score.task, score.metric, score.value, score.stderr, score.ci_low, score.ci_high))
        items |= {f"items/{task}.parquet": frame for task, frame in results.items.items()}
    scores = pl.DataFrame(
        rows, schema=["name", "metric", "value", "stderr", "ci_low", "ci_high"], orient="row"
    )
    for subject, kind, value, stderr, low, high in rows:
        name = metric(kind, subject)
        metrics[name] = value
        if stderr is not None:
            metrics[companion(name, "stderr")] = stderr
        if low is not None:
            metrics |= {companion(name, "ci_low"): low, companion(name, "ci_high"): high}
    the_protocol = protocol(config.seqlen, config.stride, prefix_label(loaded.tokenizer))
    run = tracking.open_run(store, run_id)
    run.log_metrics(metrics)
    for name, values in held_out.series.items():
        run.log_series(name, values)
    run.set_tags(
        {
            "cps.eval.corpus": config.corpus,
            "cps.eval.seqlen": config.seqlen,
            "cps.eval.limit": config.limit,
            "cps.eval.task_limits": dict(config.task_limits),
            "cps.eval.max_documents": config.max_documents,
            "cps.eval.protocol": json.dumps(the_protocol),
            EVAL_FINGERPRINT_TAG: eval_fingerprint(config),
        }
    )
    run.log_frames({"eval_scores.parquet": scores, **items})
    return EvalResult(run_id, scores, metrics, items)


@dataclass
class HeldOutScores:
    rows: list[tuple]  # (lang, metric, value, stderr, ci_low, ci_high) as in EvalResult.scores
    metrics: dict[str, float]  # the metrics that have no row (token and position counts)
    series: dict[str, list[float]]  # snr_db.<lang>.layer: the held-out SNR per layer (step = layer)
    items: dict[str, pl.DataFrame]  # items/ppl_<lang>.parquet: per-document NLL, tokens, bytes


def held_out_scores(
    loaded: LoadedModel,
    record: tracking.RunRecord,
    texts: dict[str, HeldOutText],
    options: LoadOptions,
) -> HeldOutScores:
    """Perplexity, bits per byte and, for a pruned model, the SNR of its hidden states against the
    dense model's, per language, from one forward pass over each language's windows. Evaluating the
    dense model itself records its states for later pruned models (no extra pass)."""
    from tqdm.auto import tqdm

    params = record.params
    model_key = params.get("model_id") or model_id(resolve_model(params["model"]))
    dense = params.get("method") == "dense"
    plans = {lang: reference_plan(loaded.model, model_key, text) for lang, text in texts.items()}
    # The dense states in exactly the arithmetic of the model compared with them (a sweep evaluates
    # the model it pruned, which may sit in another dtype than `options` would load).
    parameter = next(loaded.model.parameters())
    same = replace(options, dtype=str(parameter.dtype).removeprefix("torch."), device=str(parameter.device))
    states = DenseStates(lambda: load_model(params["model"], same).model)
    if not dense:  # every dense reference computed (once, cached) before this model's passes
        for lang, text in texts.items():
            states.ensure(*plans[lang], text)
        states.release()
    scores = HeldOutScores([], {}, {}, {})
    layers = len(decoder_layers(loaded.model))
    for lang, text in tqdm(texts.items(), desc="perplexity", unit="lang"):
        key, sample = plans[lang]
        observer: SnrMeter | StateRecorder | None = None
        if not dense:
            observer = SnrMeter(sample, states.get(key, sample, text))
        elif not key.path.is_file():
            observer = StateRecorder(sample, layers)
        result = score_text(loaded.model, text, observer)
        scores.rows += [
            (lang, "ppl", result.ppl, None, None, None),
            (lang, "bpb", result.bpb, None, None, None),
        ]
        scores.metrics[metric("eval_tokens", lang)] = float(result.total_tokens)
        scores.items[f"items/ppl_{lang}.parquet"] = result.frame()
        if isinstance(observer, StateRecorder) and observer.states is not None:
            save_reference(key, observer.states)
        if isinstance(observer, SnrMeter):
            per_layer = observer.snr_db
            finite = [value for value in per_layer if math.isfinite(value)]
            scores.rows.append(
                (lang, "snr_db", sum(finite) / len(finite) if finite else math.inf, None, None, None)
            )
            scores.series[layer_series("snr_db", lang)] = per_layer
            scores.metrics[metric("snr_positions", lang)] = float(sample.size)
    states.release()
    return scores
