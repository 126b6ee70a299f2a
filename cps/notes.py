"""A run's one-line description (MLflow's `mlflow.note.content`, shown on the run's page in the UI):
what the run is and its headline figures, written from what the run logged, after each stage that
adds to it (a prune run is described again once evaluated).

    wanda 50% unstructured of gemma3-270m, calibrated on sw (ntrex 8 x 256) | in-sample SNR 14.2 dB
      | held-out ppl sw 35.2 (mean of 7: 41.3), SNR 9.8 dB | sib 0.62, xcopa 0.55 (task means)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from cps import tracking
from cps.config import quant_label, run_variant
from cps.metrics import SHOWN_SCORE, metric_lang, split_task


def describe(store: tracking.Store, run_id: str) -> str:
    """Write the run's description from its params and metrics; returns it."""
    record = tracking.get_run(store, run_id)
    text = description(record.stage or "", record.params, record.metrics)
    tracking.open_run(store, run_id).set_tags({tracking.NOTE_TAG: text})
    return text


def description(stage: str, params: Mapping[str, str], metrics: Mapping[str, float]) -> str:
    """`stage`'s line for a run with these params and metrics (parts with no figures left out)."""
    if stage == "prune":
        parts = [_what_was_pruned(params), _in_sample(metrics), _held_out(params, metrics), _tasks(metrics)]
    elif stage == "calibrate":
        size = f"{params.get('nsamples', '?')} x {params.get('seqlen', '?')}"
        source = f"{params.get('calib_corpus', '?')} {params.get('calib_lang', '?')}"
        parts = [f"calibration windows for {params.get('model', '?')}: {size} tokens of {source}"]
    elif stage == "analyze":
        count = len(json.loads(params.get("runs") or "{}"))  # json: varied value -> run id
        what = " ".join(f"{params[key]}" for key in ("method", "model") if params.get(key))
        parts = [f"{what} runs compared by {params.get('vary', '?')} ({count})", _analysis(metrics)]
    elif stage == "sweep":
        done = metrics.get("cells.skipped", 0) + metrics.get("cells.finished", 0)
        failed = metrics.get("cells.failed", 0)
        parts = [
            f"study {params.get('study', '?')}: {_count(done)} of {params.get('cells', '?')} cells done"
            + (f", {_count(failed)} failed" if failed else ""),
            f"{metrics['time.sweep_s'] / 60:.1f} min" if "time.sweep_s" in metrics else "",
        ]
    else:
        parts = [stage or "run"]
    return " | ".join(part for part in parts if part)


def _what_was_pruned(params: Mapping[str, str]) -> str:
    model, method = params.get("model", "?"), params.get("method", "?")
    if method == "dense":
        return f"dense {model} (the unpruned baseline)"
    sparsity = params.get("sparsity")
    share = f"{float(sparsity):.0%} {params.get('pattern', '')}" if sparsity not in (None, "") else ""
    calibration = (
        f"{params.get('calib_corpus', '?')} {params.get('nsamples', '?')} x {params.get('seqlen', '?')}"
    )
    if quant_label(params) is not None:  # quantized: gptq-w4g128 (at sparsity 0 nothing is pruned)
        shown = run_variant(params)
        what = shown if sparsity in (None, "", "0.0", "0") else f"{shown} {share}"
    else:
        what = f"{method} {share}"
    return f"{what.strip()} of {model}, calibrated on {params.get('calib_lang', '?')} ({calibration})"


def _in_sample(metrics: Mapping[str, float]) -> str:
    value = metrics.get("calib_snr_db.mean")
    return f"in-sample SNR {value:.1f} dB" if value is not None and math.isfinite(value) else ""


def _held_out(params: Mapping[str, str], metrics: Mapping[str, float]) -> str:
    ppl = {
        metric_lang(name): value
        for name, value in metrics.items()
        if name.startswith("ppl.") and metric_lang(name)
    }
    if not ppl:
        return ""
    own = params.get("calib_lang", "")
    first = own if own in ppl else sorted(ppl)[0]
    text = f"held-out ppl {first} {ppl[first]:.1f}"
    if len(ppl) > 1:
        text += f" (mean of {len(ppl)}: {sum(ppl.values()) / len(ppl):.1f})"
    snr = [  # snr_db.<lang>, not the per-layer series snr_db.<lang>.layer (its last layer's value)
        value for name, value in metrics.items() if metric_lang(name) and name.startswith("snr_db.")
    ]
    snr = [value for value in snr if math.isfinite(value)]
    if snr:
        text += f", SNR {sum(snr) / len(snr):.1f} dB"
    return text


def _tasks(metrics: Mapping[str, float]) -> str:
    """Each task family's shown accuracy, averaged over its languages."""
    by_family: dict[str, list[float]] = {}
    for name, value in metrics.items():
        kind, _, task = name.partition(".")
        family = split_task(task)[0]
        if kind == SHOWN_SCORE.get(family, "acc"):
            by_family.setdefault(family, []).append(value)
    if not by_family:
        return ""
    means = ", ".join(f"{family} {sum(v) / len(v):.2f}" for family, v in sorted(by_family.items()))
    return f"{means} (task means)"


def _analysis(metrics: Mapping[str, float]) -> str:
    shown = {
        "iou.mean": "mask IoU {:.3f}",
        "cross_snr.own_lang_best": "own calibration best (held-out SNR) in {:.0%} of languages",
        "lsar.specific_share.mean": "LSAR specific share {:.2f}",
        "lape.overlap.mean": "LAPE overlap {:.2f}",
    }
    values = [(text, metrics.get(name)) for name, text in shown.items()]
    return ", ".join(text.format(v) for text, v in values if v is not None and math.isfinite(v))


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
