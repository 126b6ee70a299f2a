"""What a study will cost on this machine, and what its items can detect, before it runs
(`cps sweep --dry-run`).

Time. One dense forward pass of the model is measured here (a batch of 8 x 256 tokens, the best of
three after a warm-up; cached per machine, model, torch version and thread count in
`CPS_CACHE_DIR/timing/`), as seconds per token. The study's work is counted in tokens, from its own
data: the calibration tokens of each pruned cell, the held-out tokens of the evaluation languages
(the documents tokenized), the positions every task item puts through the model (context, and each
choice after its delimiter; each choice alone again for acc_mutual_info), and the analysis tokens.
Seconds = tokens x seconds per token x a factor per kind of work, plus a fixed cost per cell and
per analysis: the factors and fixed costs (COSTS) were fitted to the measured split of
`studies/findings.toml` on a 2-core machine and checked against `studies/demo.toml`'s measured
time there (README, Findings).

Power. The smallest pooled own-language accuracy effect a study's item counts can detect (80% power,
two-sided 5%): POWER_Z x sqrt(v / (items x languages) + tau^2 / languages), with v the variance of
the per-item paired difference (own minus the mean of the others) and tau the spread of the true
effect across languages, both measured on the findings study (PLANNING).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2

from cps import paths
from cps.analysis.findings import POWER_Z
from cps.evaluation.tasks import BUILDERS, families, pack_family
from cps.metrics import SHOWN_SCORE, split_task
from cps.models import LoadOptions, model_id, resolve_model
from cps.study import Study

BATCH, LENGTH = 8, 256

# Seconds = tokens x seconds per dense token x factor (+ fixed seconds), fitted on findings.toml.
COSTS = {
    "prune_passes": {"wanda": 2.3, "magnitude": 2.3, "sparsegpt": 3.0},  # x calibration tokens
    "prune_fixed_s": 12.0,  # a cell's model load, calibration set, masks and logging
    "held_out": 3.0,  # x held-out tokens: the pass, the SNR meter, the dense states once
    "task": 1.0,  # x task positions
    "eval_fixed_s": 10.0,  # a cell's lm-eval set-up and logging
    "analysis": 2.5,  # x analysis tokens x (members + 1): statistics passes
    "analysis_fixed_s": 20.0,
}
# Planning values for the detectable effect, per task family (accuracy): v and tau^2, measured on
# the findings study (Gemma-3 270M, Wanda and SparseGPT at 50%).
PLANNING = {"default": (0.2, 0.0004)}


@dataclass(frozen=True)
class TimeEstimate:
    seconds_per_token: float
    measured: str  # when and how the dense pass was measured
    prune_s: float
    eval_s: float
    analyses_s: float

    @property
    def total_s(self) -> float:
        return self.prune_s + self.eval_s + self.analyses_s


@dataclass(frozen=True)
class TaskPower:
    family: str
    languages: int
    items: int  # per language (the fewest)
    detectable: float  # accuracy points / 100


def dense_seconds_per_token(model: str, options: LoadOptions) -> tuple[float, str]:
    """Seconds per token of one dense forward pass on this machine (cached per machine)."""
    import torch

    from cps.models import load_model

    resolved = resolve_model(model)
    machine = f"{platform.node()}-{torch.__version__}-{torch.get_num_threads()}t"
    key = f"{model_id(resolved)}-{machine}-{options.dtype}"
    cache = paths.cache_dir() / "timing" / f"{key.replace('/', '_')}.json"
    if cache.is_file():
        try:
            record = json.loads(cache.read_text())
            return float(record["seconds_per_token"]), f"measured {record['when']} on this machine"
        except (ValueError, KeyError):
            paths.discard(cache, "not a timing record")
    loaded = load_model(model, options, tokenizer=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (BATCH, LENGTH))
    times = []
    with torch.inference_mode():
        for _ in range(4):
            start = time.perf_counter()
            loaded.model(input_ids=ids)
            times.append(time.perf_counter() - start)
    per_token = min(times[1:]) / (BATCH * LENGTH)
    when = time.strftime("%Y-%m-%d %H:%M")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staged = paths.staging(cache)
    staged.write_text(json.dumps({"seconds_per_token": per_token, "when": when}))
    paths.publish(staged, cache)
    return per_token, f"measured now ({when})"


@dataclass(frozen=True)
class TaskWork:
    items: int
    positions: int  # distinct positions through the decoder: each context once, every choice
    scored: int  # positions whose log-probability is read (every choice's tokens): the LM head's rows


def task_work(
    names: list[str], data_dir: str | None, tokenizer: Any, limits: Mapping[str, float | None]
) -> dict[str, TaskWork]:
    """Per pack task: the items the study evaluates and the positions they put through the model
    (each choice after the task's delimiter; each choice alone again where the score is
    acc_mutual_info)."""
    work = {}
    for name in names:
        family = pack_family(name)
        if family is None:
            continue
        spec = families()[family]
        lang = split_task(name)[1]
        config = spec["lm_eval"]
        rows = BUILDERS[spec["builder"]].items(lang, data_dir)[
            config.get("test_split") or config["validation_split"]
        ]
        limit = limits.get(name)
        if limit is not None:
            rows = rows[: math.ceil(len(rows) * limit) if limit < 1 else int(limit)]
        delimiter = config.get("target_delimiter", " ")
        prompt = jinja2.Template(config["doc_to_text"])  # as lm-eval renders it
        alone = 2 if SHOWN_SCORE.get(family) == "acc_mutual_info" else 1
        positions = scored = 0
        for row in rows:
            positions += len(tokenizer(prompt.render(**row))["input_ids"])
            for choice in row.get("choices") or []:
                length = len(tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"])
                positions += alone * length
                scored += alone * length
        work[name] = TaskWork(len(rows), positions, scored)
    return work


def estimate_time(study: Study, tasks: list[str]) -> TimeEstimate | None:
    """The study's wall time on this machine (one cell after another), None for several models."""
    from cps.data import get_corpus
    from cps.models import load_tokenizer

    models = {cell.prune.model for cell in study.cells}
    if len(models) != 1:
        return None
    (model,) = models
    first = study.cells[0].prune
    per_token, measured = dense_seconds_per_token(model, LoadOptions(first.dtype, "cpu"))
    tokenizer = load_tokenizer(model)
    evaluate = study.evaluate
    corpus = get_corpus(evaluate.corpus, evaluate.data_dir)
    held_out = sum(
        len(tokenizer(doc.text)["input_ids"])
        for lang in evaluate.langs
        for doc in corpus.documents(lang)[: evaluate.max_docs]
    )
    limits = {name: evaluate.limit_for(name) for name in tasks}
    positions = sum(w.positions for w in task_work(tasks, evaluate.data_dir, tokenizer, limits).values())
    prune = evaluate_s = 0.0
    for cell in study.cells:
        calibration = cell.prune.calibration
        if calibration is not None:
            passes = COSTS["prune_passes"].get(cell.prune.method_name, 3.0)
            prune += COSTS["prune_fixed_s"] + passes * calibration.nsamples * calibration.seqlen * per_token
        evaluate_s += COSTS["eval_fixed_s"] + per_token * (
            COSTS["held_out"] * held_out + COSTS["task"] * positions
        )
    analyses = 0.0
    pruned = [cell for cell in study.cells if cell.prune.calibration is not None]
    for config in study.analyses:
        settings = {(c.prune.method_name, c.prune.pattern, c.prune.sparsity) for c in pruned}
        for _ in settings:
            members = len(pruned) // max(1, len(settings))
            analyses += COSTS["analysis_fixed_s"]
            if config.activations:
                tokens = sum(
                    len(tokenizer(doc.text)["input_ids"])
                    for lang in config.langs
                    for doc in get_corpus(config.corpus, config.data_dir).documents(lang)[: config.max_docs]
                )
                analyses += COSTS["analysis"] * tokens * (members + 1) * per_token
    return TimeEstimate(per_token, measured, prune, evaluate_s, analyses)


def task_power(study: Study, tasks: list[str]) -> list[TaskPower]:
    """The smallest pooled own-language accuracy effect each task family's items can detect."""
    evaluate = study.evaluate
    calib = {
        lang for cell in study.cells if cell.prune.calibration for lang in cell.prune.calibration.mixture
    }
    by_family: dict[str, list[int]] = {}
    for name in tasks:
        family, lang = split_task(name)
        if pack_family(name) is None or lang not in calib:
            continue
        spec = families()[family]
        config = spec["lm_eval"]
        rows = BUILDERS[spec["builder"]].items(lang, evaluate.data_dir)[
            config.get("test_split") or config["validation_split"]
        ]
        limit = evaluate.limit_for(name)
        count = len(rows) if limit is None else (math.ceil(len(rows) * limit) if limit < 1 else int(limit))
        by_family.setdefault(family, []).append(min(count, len(rows)))
    found = []
    for family, counts in by_family.items():
        v, tau2 = PLANNING.get(family, PLANNING["default"])
        languages, items = len(counts), min(counts)
        detectable = POWER_Z * math.sqrt(v / (items * languages) + tau2 / languages)
        found.append(TaskPower(family, languages, items, detectable))
    return found
