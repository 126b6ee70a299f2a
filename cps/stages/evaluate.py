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
from cps.data import get_corpus
from cps.errors import CpsError
from cps.evaluation.hidden import DenseStates, SnrMeter, StateRecorder, reference_plan, save_reference
from cps.evaluation.perplexity import DeferredHead, text_result
from cps.evaluation.tasks import check_eval_inputs, run_tasks
from cps.evaluation.windows import HeldOutText, cached_windows, protocol
from cps.metrics import companion, layer_series, metric
from cps.models import (
    LoadedModel,
    LoadOptions,
    decoder_layers,
    forget_tokenizers,
    model_id,
    resolve_device,
    resolve_model,
)
from cps.runs import dense_run, load_run_model
from cps.stages.calibrate import tokenizer_or_fingerprint
from cps.streaming import load, model_device, return_freed_memory, streamed, wants_stream


@dataclass
class EvalResult:
    run_id: str
    scores: pl.DataFrame  # long: name (lang or task), metric, value, stderr, ci_low, ci_high
    metrics: dict[str, float]
    items: dict[str, pl.DataFrame]  # artifact name (items/...) -> per-document or per-item results


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
    run_id = run_id or dense_run(store, str(model), config.dtype)
    record = tracking.get_run(store, run_id)
    if record.stage != "prune":
        raise CpsError(f"run {run_id} is a {record.stage} run; evaluate prune runs (or --model)")
    options = config.load_options
    stream = (
        wants_stream(record.params["model"], options)
        if loaded is None
        else streamed(loaded.model) is not None
    )
    if stream and task_names:  # before loading (a streamed SparseGPT run may be pruned again first)
        raise CpsError(
            "zero-shot tasks run the whole model (lm-eval): evaluate them with --no-stream, "
            "perplexity and SNR with --stream"
        )
    if loaded is None:  # streamed: no tokenizer (Gemma-3's holds 0.12 GB) unless text is new to it
        loaded = load_run_model(store, record, options, tokenizer=not stream)
    elif not stream:
        loaded.model.to(resolve_device(config.device))
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
    the_protocol = protocol(config.seqlen, config.stride, labels.pop())
    if stream:
        loaded.tokenizer = tokenizer = None  # type: ignore[assignment]  # windowed already
        forget_tokenizers()
        return_freed_memory(collect=True)
    held_out = held_out_scores(loaded, record, texts, options)
    rows, metrics, items = held_out.rows, held_out.metrics, held_out.items
    limits = {name: config.limit_for(name) for name in task_names}
    results = run_tasks(
        loaded.model, loaded.tokenizer, task_names, config.data_dir, None, config.batch_size, limits
    )
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
            "cps.eval.max_documents": config.max_docs,
            "cps.eval.protocol": json.dumps(the_protocol),
            "cps.eval.weights": loaded.origin,
            EVAL_FINGERPRINT_TAG: config.fingerprint(),
        }
    )
    run.log_frames({"eval_scores.parquet": scores, **items})
    tracking.log_datasets(
        run,
        [
            tracking.DatasetRecord(
                name=f"{config.corpus}:{lang}",
                digest=text.fingerprint(),
                source=str(corpus.root),
                context="evaluation",
                profile={"documents": len(text.documents), "scored_tokens": sum(text.tokens)},
            )
            for lang, text in texts.items()
        ],
    )
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
    params = record.params
    model_key = params.get("model_id") or model_id(resolve_model(params["model"]))
    dense = params.get("method") == DENSE
    plans = {lang: reference_plan(loaded.model, model_key, text) for lang, text in texts.items()}
    # The dense states in exactly the arithmetic of the model compared with them (a sweep evaluates
    # the model it pruned, which may sit in another dtype than `options` would load).
    parameter = next(loaded.model.parameters())
    dtype = str(parameter.dtype).removeprefix("torch.")
    same = replace(options, dtype=dtype, device=str(model_device(loaded.model)))
    states = DenseStates(lambda: load(params["model"], same, tokenizer=False).model)
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
            per_layer = observer.snr_db
            finite = [value for value in per_layer if math.isfinite(value)]
            snr_rows[lang] = (
                lang,
                "snr_db",
                sum(finite) / len(finite) if finite else math.inf,
                None,
                None,
                None,
            )
            scores.series[layer_series("snr_db", lang)] = per_layer
            scores.metrics[metric("snr_positions", lang)] = float(sample.size)
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
