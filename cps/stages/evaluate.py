"""`cps eval`: perplexity, bits per byte and held-out SNR per language, and zero-shot tasks, logged
into the evaluated prune run (`cps.runs` turns the run back into its model: saved weights, dense x
masks, kept weights, or pruned again). `cps eval --model M` evaluates the dense model into its
`method=dense` run (`cps.runs.dense_run`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import polars as pl
from tqdm.auto import tqdm

from cps import tracking
from cps.config import DENSE, EVAL_FINGERPRINT_TAG, EvalConfig
from cps.data import Corpus, get_corpus
from cps.errors import CpsError
from cps.evaluation.hidden import (
    DenseStates,
    PositionSample,
    SnrMeter,
    StateRecorder,
    reference_plan,
    save_reference,
)
from cps.evaluation.perplexity import DeferredHead, text_result
from cps.evaluation.tasks import check_eval_inputs, run_tasks
from cps.evaluation.windows import HeldOutText, cached_windows, protocol
from cps.metrics import companion, layer_series, metric
from cps.models import (
    LoadedModel,
    LoadOptions,
    decoder_layers,
    dtype_name,
    forget_tokenizers,
    model_id,
    placement,
    resolve_model,
)
from cps.notes import describe
from cps.runs import dense_run, load_run_model
from cps.stages.calibrate import tokenizer_or_fingerprint
from cps.streaming import load, model_device, return_freed_memory, streamed, wants_stream


@dataclass
class EvalResult:
    run_id: str
    scores: pl.DataFrame  # long: name (lang or task), metric, value, stderr, ci_low, ci_high
    metrics: dict[str, float]
    items: dict[str, pl.DataFrame]  # artifact name (items/...) -> per-document or per-item results


@dataclass
class HeldOutScores:
    rows: list[tuple]  # (name, metric, value, stderr, ci_low, ci_high) as in EvalResult.scores
    metrics: dict[str, float]  # the metrics that have no row (token and position counts)
    series: dict[str, list[float]]  # snr_db.<lang>.layer: the held-out SNR per layer (step = layer)
    items: dict[str, pl.DataFrame]  # items/ppl_<lang>.parquet: per-document NLL, tokens, bytes


@dataclass
class Windows:
    """Each language's held-out windows, and what the run records of them."""

    texts: dict[str, HeldOutText]
    protocol: dict  # the held-out protocol (`cps.evaluation.windows.protocol`)
    source: str  # the corpus's folder


def run_eval(
    config: EvalConfig,
    store: tracking.Store,
    run_id: str | None = None,
    loaded: LoadedModel | None = None,
    model: str | None = None,
) -> EvalResult:
    """Scores of the prune run's model (`loaded` when the caller already holds it) logged into it;
    with `model` instead of a run, the dense model's, into its `method=dense` run."""
    if (run_id is None) == (model is None):
        raise CpsError("give a run id to evaluate, or --model for the dense baseline (not both)")
    tracking.client(store)
    langs, task_names = check_eval_inputs(config)  # before any run is created or model loaded
    corpus = get_corpus(config.corpus, config.data_dir)
    dtype = dtype_name(placement(config.load_options).dtype)  # (an unusable device fails here)
    record = tracking.get_run(store, run_id or dense_run(store, str(model), dtype))
    if record.stage != "prune":
        raise CpsError(f"run {record.run_id} is a {record.stage} run; evaluate prune runs (or --model)")
    loaded = _load(config, store, record, loaded, tasks=bool(task_names))
    windows = _window(config, corpus, langs, loaded, record)
    scores = _score(config, loaded, record, windows.texts, task_names)
    return _log(store, record.run_id, config, loaded.origin, windows, scores)


def _load(
    config: EvalConfig,
    store: tracking.Store,
    record: tracking.RunRecord,
    loaded: LoadedModel | None,
    tasks: bool,
) -> LoadedModel:
    """The run's model (`loaded` when the caller holds it: moved to the device unless streamed).
    Streamed, it comes without a tokenizer (Gemma-3's holds 0.12 GB) unless text is new to it."""
    options = config.load_options
    stream = (
        wants_stream(record.params["model"], options)
        if loaded is None
        else streamed(loaded.model) is not None
    )
    if stream and tasks:  # before loading (a streamed SparseGPT run may be pruned again first)
        raise CpsError(
            "zero-shot tasks run the whole model (lm-eval): evaluate them with --no-stream, "
            "perplexity and SNR with --stream"
        )
    if loaded is None:
        return load_run_model(store, record, options, tokenizer=not stream)
    if not stream:
        loaded.model.to(placement(options).device)
    return loaded


def _window(
    config: EvalConfig, corpus: Corpus, langs: list[str], loaded: LoadedModel, record: tracking.RunRecord
) -> Windows:
    """Each language's held-out windows (cached by content: text windowed before needs no
    tokenizer). A streamed model then lets go of its tokenizer: the layers get its memory."""
    tokenizer, fingerprint = (
        (loaded.tokenizer, None)
        if loaded.tokenizer is not None
        else tokenizer_or_fingerprint(record.params["model"])
    )
    texts, labels = {}, set()
    for lang in langs:
        texts[lang], label = cached_windows(
            corpus, lang, config.max_docs, tokenizer, config.seqlen, config.stride, fingerprint
        )
        labels.add(label)
    if streamed(loaded.model) is not None:
        loaded.tokenizer = None  # type: ignore[assignment]  # windowed already
        forget_tokenizers()
        return_freed_memory(collect=True)
    return Windows(texts, protocol(config.seqlen, config.stride, labels.pop()), str(corpus.root))


def _score(
    config: EvalConfig,
    loaded: LoadedModel,
    record: tracking.RunRecord,
    texts: dict[str, HeldOutText],
    task_names: list[str],
) -> HeldOutScores:
    """The held-out scores, then the zero-shot tasks': every row also as metrics (with its stderr
    and interval where it has them), per-item frames beside the held-out ones."""
    scores = held_out_scores(loaded, record, texts, config.load_options)
    limits = {name: config.limit_for(name) for name in task_names}
    results = run_tasks(
        loaded.model, loaded.tokenizer, task_names, config.data_dir, None, config.batch_size, limits
    )
    for score in results.scores:
        scores.rows.append((score.task, score.metric, score.value, score.stderr, score.ci_low, score.ci_high))
    scores.items |= {f"items/{task}.parquet": frame for task, frame in results.items.items()}
    for subject, kind, value, stderr, low, high in scores.rows:
        name = metric(kind, subject)
        scores.metrics[name] = value
        if stderr is not None:
            scores.metrics[companion(name, "stderr")] = stderr
        if low is not None:
            scores.metrics |= {companion(name, "ci_low"): low, companion(name, "ci_high"): high}
    return scores


def _log(
    store: tracking.Store,
    run_id: str,
    config: EvalConfig,
    origin: str,
    windows: Windows,
    scores: HeldOutScores,
) -> EvalResult:
    """Metrics, series, tags, frames and one dataset input per language, into the prune run."""
    frame = pl.DataFrame(
        scores.rows, schema=["name", "metric", "value", "stderr", "ci_low", "ci_high"], orient="row"
    )
    run = tracking.open_run(store, run_id)
    run.log_metrics(scores.metrics)
    for name, values in scores.series.items():
        run.log_series(name, values)
    run.set_tags(
        {
            "cps.eval.corpus": config.corpus,
            "cps.eval.seqlen": config.seqlen,
            "cps.eval.limit": config.limit,
            "cps.eval.task_limits": dict(config.task_limits),
            "cps.eval.max_documents": config.max_docs,
            "cps.eval.protocol": json.dumps(windows.protocol),
            "cps.eval.weights": origin,
            EVAL_FINGERPRINT_TAG: config.fingerprint(),
        }
    )
    run.log_frames({"eval_scores.parquet": frame, **scores.items})
    tracking.log_datasets(
        run,
        [
            tracking.DatasetRecord(
                name=f"{config.corpus}:{lang}",
                digest=text.fingerprint(),
                source=windows.source,
                context="evaluation",
                profile={"documents": len(text.documents), "scored_tokens": sum(text.tokens)},
            )
            for lang, text in windows.texts.items()
        ],
    )
    describe(store, run_id)  # the run's line in the UI, now with its held-out and task figures
    return EvalResult(run_id, frame, scores.metrics, scores.items)


def held_out_scores(
    loaded: LoadedModel,
    record: tracking.RunRecord,
    texts: dict[str, HeldOutText],
    options: LoadOptions,
) -> HeldOutScores:
    """Perplexity, bits per byte and, for a pruned model, the SNR of its hidden states against the
    dense model's, per language, from one forward pass over each language's windows. Evaluating the
    dense model itself records its states for later pruned models (no extra pass)."""
    params = record.params
    model_key = params.get("model_id") or model_id(resolve_model(params["model"]))
    dense = params.get("method") == DENSE
    plans = {lang: reference_plan(loaded.model, model_key, text) for lang, text in texts.items()}
    states = _dense_states(loaded, params["model"], options)
    if not dense:  # every dense reference computed (once, cached) before this model's passes
        for lang, text in texts.items():
            states.ensure(*plans[lang], text)
        states.release()
    scores = HeldOutScores([], {}, {}, {})
    layers = len(decoder_layers(loaded.model))
    deferred = DeferredHead(loaded.model)  # the LM head once, over every language's states
    snr_rows: dict[str, tuple] = {}
    for lang, text in tqdm(texts.items(), desc="perplexity", unit="lang"):
        key, sample = plans[lang]
        observer: SnrMeter | StateRecorder | None = None
        if not dense:
            observer = SnrMeter(sample, states.get(key, sample, text))
        elif not key.path.is_file():
            observer = StateRecorder(sample, layers)
        deferred.add(text.windows, observer)
        if isinstance(observer, StateRecorder) and observer.states is not None:
            save_reference(key, observer.states)
        if isinstance(observer, SnrMeter):
            snr_rows[lang] = _snr_row(lang, observer, sample, scores)
    states.release()
    for (lang, text), per_window in zip(texts.items(), deferred.nlls(), strict=True):
        result = text_result(text, per_window)
        scores.rows += [
            (lang, "ppl", result.ppl, None, None, None),
            (lang, "bpb", result.bpb, None, None, None),
        ]
        scores.metrics[metric("eval_tokens", lang)] = float(result.total_tokens)
        scores.items[f"items/ppl_{lang}.parquet"] = result.frame()
        scores.rows += [snr_rows[lang]] if lang in snr_rows else []
    return scores


def _dense_states(loaded: LoadedModel, model: str, options: LoadOptions) -> DenseStates:
    """The dense model's states, loaded only where not cached, in exactly the arithmetic of the
    model compared with them: its dtype and device (a sweep evaluates the model it pruned, which may
    sit in another dtype than `options` would load)."""
    dtype = dtype_name(next(loaded.model.parameters()).dtype)
    same = replace(options, dtype=dtype, device=str(model_device(loaded.model)), hold_on_cpu=False)
    return DenseStates(lambda: load(model, same, tokenizer=False).model)


def _snr_row(lang: str, meter: SnrMeter, sample: PositionSample, scores: HeldOutScores) -> tuple:
    """The held-out SNR of `lang`: its row (the mean over layers of finite values), its series per
    layer and its position count into `scores`."""
    per_layer = meter.snr_db
    finite = [value for value in per_layer if math.isfinite(value)]
    scores.series[layer_series("snr_db", lang)] = per_layer
    scores.metrics[metric("snr_positions", lang)] = float(sample.size)
    return (lang, "snr_db", sum(finite) / len(finite) if finite else math.inf, None, None, None)
