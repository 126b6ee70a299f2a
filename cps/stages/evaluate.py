"""`cps eval`: perplexity per language and zero-shot tasks, logged into the evaluated model's run.

A prune run is evaluated with its pruned weights: the `model/` artifact when it was saved, else the
dense model rebuilt with the saved masks (Wanda, magnitude) or pruned again from the same
calibration set and checked against the saved masks (SparseGPT, whose weights are updated).
`--model` alone evaluates the dense model into its `method=dense` run, reused when one exists.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cps import tracking
from cps.data import get_corpus
from cps.data.calibration import CalibrationConfig
from cps.errors import CpsError
from cps.evaluation.perplexity import perplexity
from cps.evaluation.tasks import expand_tasks, run_tasks, split_task, task_configs
from cps.languages import PAPER_LANGUAGES, get_language
from cps.models import (
    LoadedModel,
    LoadOptions,
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
    seqlen: int = 1024
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
        split = split_task(task)
        family = split[0] if split else None
        return limits.get(task, limits.get(family, self.limit) if family else self.limit)


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
        "limit": config.limit,
        "task_limits": sorted(config.task_limits),
        "max_documents": config.max_documents,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalResult:
    run_id: str
    scores: pl.DataFrame  # long: name (lang or task), metric, value, stderr
    metrics: dict[str, float]


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
    import polars as pl
    from tqdm.auto import tqdm

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
    if loaded is None:
        loaded = load_run_model(store, record, LoadOptions(config.dtype, config.device))
    else:
        loaded.model.to(resolve_device(config.device))
    rows = []
    for lang in tqdm(langs, desc="perplexity", unit="lang"):
        documents = corpus.documents(lang)[: config.max_documents]
        result = perplexity(loaded.model, loaded.tokenizer, documents, config.seqlen)
        rows += [(lang, "ppl", result.ppl, None), (lang, "bpb", result.bpb, None)]
        rows.append((lang, "tokens", float(result.tokens), None))
    by_limit: dict[float | None, list[str]] = {}
    for name in task_names:
        by_limit.setdefault(config.limit_for(name), []).append(name)
    for limit, names in by_limit.items():
        for score in run_tasks(
            loaded.model, loaded.tokenizer, names, config.data_dir, limit, config.batch_size
        ):
            rows.append((score.task, score.metric, score.value, score.stderr))
    scores = pl.DataFrame(rows, schema=["name", "metric", "value", "stderr"], orient="row")
    metrics = {}
    for name, metric, value, stderr in rows:
        key = "eval_tokens" if metric == "tokens" else metric
        metrics[f"{key}.{name}"] = value
        if stderr is not None:
            metrics[f"{metric}_stderr.{name}"] = stderr
    run = tracking.open_run(store, run_id)
    run.log_metrics(metrics)
    run.set_tags(
        {
            "cps.eval.corpus": config.corpus,
            "cps.eval.seqlen": config.seqlen,
            "cps.eval.limit": config.limit,
            "cps.eval.task_limits": dict(config.task_limits),
            "cps.eval.max_documents": config.max_documents,
            EVAL_FINGERPRINT_TAG: eval_fingerprint(config),
        }
    )
    run.log_frame(scores, "eval_scores.parquet")
    return EvalResult(run_id, scores, metrics)
