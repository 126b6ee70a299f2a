"""Metric names: how cps names what it logs, and how a name is read back (eval, report, CLI).

    <kind>.<subject>                 one value:    ppl.sw  bpb.sw  snr_db.sw  acc.sib_sw  calib_snr_db.mean
    <kind>.<subject>.layer           per layer:    snr_db.sw.layer (step = layer)  calib_snr_db.layer
    <accuracy>_stderr.<task>         lm-eval's standard error
    <accuracy>_ci_low.<task>, _ci_high  Wilson 95% interval over the items
    margin.<task> (and _norm, _mutual_info)  mean gold-over-best-other margin, t 95% interval

The subject of a held-out metric is a language code; of a task metric the task, named
`<family>_<lang>` when it ends in a language code (sib_sw, flores_next_zh, global_mmlu_sw) and
language-free otherwise (mmlu).
"""

from __future__ import annotations

from cps.languages import LANGUAGES

ACCURACIES = ("acc", "acc_norm", "acc_mutual_info")
# Per multiple-choice item: the gold choice's score minus the best other's, under each accuracy's
# score (log-likelihood, per character, minus the unconditional log-likelihood).
MARGIN_OF = {"acc": "margin", "acc_norm": "margin_norm", "acc_mutual_info": "margin_mutual_info"}
MARGINS = tuple(MARGIN_OF.values())
SCORES = (*ACCURACIES, "exact_match", "f1", *MARGINS)  # what task evaluations log per task
# Task families whose accuracy to read is another score (flores_next: acc_mutual_info, as plain acc
# rewards short candidates; mkqa, a generative task: token F1); the report shows it as their `acc`.
SHOWN_SCORE = {"flores_next": "acc_mutual_info", "mkqa": "f1"}
BINARY = (*ACCURACIES, "exact_match")  # per-item 0/1 scores, which carry Wilson intervals
INTERVAL = ("ci_low", "ci_high")
LAYER = "layer"
# Report families whose metrics go by another kind (`--metrics snr` reads snr_db.<lang>).
FAMILY_KIND = {"snr": "snr_db"}
LANGUAGE_KINDS = ("ppl", "bpb", "snr_db", "eval_tokens", "snr_positions")  # subject = a language


def metric(kind: str, subject: str) -> str:
    """ppl + sw -> ppl.sw; acc + sib_sw -> acc.sib_sw."""
    return f"{kind}.{subject}"


def layer_series(kind: str, subject: str) -> str:
    """snr_db + sw -> snr_db.sw.layer (one point per decoder layer)."""
    return f"{kind}.{subject}.{LAYER}"


def companion(name: str, suffix: str) -> str:
    """acc.sib_sw + ci_low -> acc_ci_low.sib_sw (stderr, ci_low, ci_high of an accuracy)."""
    kind, _, subject = name.partition(".")
    return f"{kind}_{suffix}.{subject}"


def kind_of(family: str) -> str:
    """The metric kind a report family reads: snr -> snr_db, ppl -> ppl."""
    return FAMILY_KIND.get(family, family)


def split_task(task: str) -> tuple[str, str | None]:
    """'flores_next_sw' -> ('flores_next', 'sw'); 'mmlu' -> ('mmlu', None)."""
    family, _, lang = task.rpartition("_")
    return (family, lang) if family and lang in LANGUAGES else (task, None)


def metric_lang(name: str) -> str | None:
    """The language a metric is named after: ppl.sw -> sw, acc.xcopa_zh -> zh; None for per-layer
    series and language-free names (calib_snr_db.mean, acc.mmlu)."""
    kind, _, subject = name.partition(".")
    if not subject or subject.endswith(f".{LAYER}"):
        return None
    if kind in LANGUAGE_KINDS:
        return subject if subject in LANGUAGES else None
    return split_task(subject)[1]


def task_family(name: str) -> str:
    """acc.sib_sw -> sib; acc.flores_next_en -> flores_next; acc.mmlu -> mmlu."""
    return split_task(name.partition(".")[2])[0]
