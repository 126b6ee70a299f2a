"""What a study will cost on this machine, and what its items can detect, before it runs
(`cps sweep --dry-run`).

Time. Two rates are measured here: the decoder's seconds per token (every layer, no head; a batch
of 8 x 256 tokens, the best of three after a warm-up) and the LM head's seconds per scored position
(its log-softmax over the whole vocabulary, as cps scores), cached per machine, model, torch
version, thread count and dtype in `CPS_CACHE_DIR/timing/`. The study's work is counted from its
own data: the calibration tokens of each pruned cell (decoder passes), the held-out tokens of the
evaluation languages (the documents tokenized; decoder and head), the positions every task item puts
through the decoder (its prompt, and each choice after its delimiter; each choice alone again for
acc_mutual_info) and those the head scores (the choices' tokens), and the analysis tokens. Seconds =
work x rates x a factor per kind of work, plus a fixed cost per cell and per analysis: the factors
and fixed costs (COSTS) were fitted to the measured split of `studies/findings.toml` on a 2-core
machine and checked against `studies/demo.toml` there (README, Findings).

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
from cps.analysis.findings import LANGUAGE_ITEMS, MIN_ITEMS, POWER_Z
from cps.config import PruneConfig
from cps.data.selfgen import BATCH_WINDOWS, is_self
from cps.evaluation.tasks import BUILDERS, families, pack_family
from cps.metrics import SHOWN_SCORE, split_task
from cps.models import LoadOptions, model_id, resolve_model
from cps.study import Study

BATCH, LENGTH = 8, 256
HEAD_ROWS = 512

# Seconds = the measured rates x the study's counted work x a factor per kind of work, plus fixed
# seconds; the factors and fixed costs fitted to studies/findings.toml's measured split (2 cores).
COSTS = {
    # x the decoder over the calibration tokens: Wanda's statistics and pruned passes; SparseGPT's
    # also its Hessians and column loops (3.7 measured on findings.toml's 8,192-token windows)
    "prune_passes": {
        "wanda": 2.3,
        "magnitude": 2.3,
        "sparsegpt": 3.7,
        "ria": 2.5,
        "shortgpt": 1.2,
        "gptq": 3.7,
        "rtn": 2.3,
    },
    # around the method (benchmarks/prune_bench.py, 32 x 512 tokens): OWL's dense pass with its
    # statistics, DSnoT's swap loop as a factor; self-generated text per sampling step (a batch of
    # up to 32 windows through the whole LM head: 43 s for 8 x 256 tokens of Gemma-3 270M)
    "owl_passes": 1.1,
    "dsnot_factor": 1.2,
    "selfgen_step_s": 0.17,
    "prune_fixed_s": 3.0,  # a cell's model load, calibration set, masks and logging
    "held_out": 3.0,  # x held-out tokens' decoder + head: the pass, the SNR meter, dense states
    "task": 0.9,  # x task work (decoder over the positions, head over the scored ones)
    "eval_fixed_s": 10.0,  # a cell's lm-eval set-up and logging
    "analysis": 2.5,  # x analysis tokens' decoder passes x (members + 1)
    "analysis_fixed_s": 20.0,
}
# Planning values for the detectable effect (accuracy), measured on findings.toml (Gemma-3 270M,
# Wanda and SparseGPT at 50%, 7 languages): v, the variance over items of the paired difference
# own - mean(others), and tau^2, the variance of the true effect across languages (the observed
# variance of the per-language effects less their sampling variance). SIB's tau^2 stands in where
# 10 items a language cannot measure it.
PLANNING = {"sib": (0.068, 0.00091), "flores_next": (0.091, 0.00091), "default": (0.07, 0.00091)}


@dataclass(frozen=True)
class Rates:
    decoder_s: float  # seconds per token of the decoder (every layer, no head)
    head_s: float  # seconds per position of the LM head with its log-softmax (OutputHead)
    measured: str  # when

    def seconds(self, positions: float, scored: float) -> float:
        return positions * self.decoder_s + scored * self.head_s


@dataclass(frozen=True)
class TimeEstimate:
    rates: Rates
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
    detectable: float | None  # accuracy points / 100; None: too few items to test


def measured_rates(model: str, options: LoadOptions) -> Rates:
    """This machine's decoder seconds per token (a batch of BATCH x LENGTH tokens, the best of three
    after a warm-up) and LM-head seconds per scored position (HEAD_ROWS states through
    `OutputHead`), cached per machine, model, torch version, threads and dtype."""
    import torch

    from cps.evaluation.perplexity import OutputHead
    from cps.models import load_model

    machine = f"{platform.node()}-{torch.__version__}-{torch.get_num_threads()}t"
    key = f"{model_id(resolve_model(model))}-{machine}-{options.dtype}".replace("/", "_")
    cache = paths.cache_dir() / "timing" / f"{key}.json"
    if cache.is_file():
        try:
            record = json.loads(cache.read_text())
            return Rates(record["decoder_s"], record["head_s"], f"measured {record['when']}")
        except (ValueError, KeyError, TypeError):
            paths.discard(cache, "not a timing record")
    loaded = load_model(model, options, tokenizer=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (BATCH, LENGTH))
    head = OutputHead(loaded.model)
    times: dict[str, list[float]] = {"decoder": [], "head": []}
    with torch.inference_mode():
        for _ in range(4):
            start = time.perf_counter()
            states = loaded.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            times["decoder"].append(time.perf_counter() - start)
            start = time.perf_counter()
            head.scores(states.reshape(-1, states.shape[-1])[:HEAD_ROWS], ids.flatten()[:HEAD_ROWS])
            times["head"].append(time.perf_counter() - start)
    decoder = min(times["decoder"][1:]) / (BATCH * LENGTH)
    per_row = min(times["head"][1:]) / HEAD_ROWS
    when = time.strftime("%Y-%m-%d %H:%M")
    cache.parent.mkdir(parents=True, exist_ok=True)
    staged = paths.staging(cache)
    staged.write_text(json.dumps({"decoder_s": decoder, "head_s": per_row, "when": when}))
    paths.publish(staged, cache)
    return Rates(decoder, per_row, f"measured now, {when}")


@dataclass(frozen=True)
class TaskWork:
    items: int
    positions: int  # distinct positions through the decoder: each context once, every choice
    scored: int  # distinct positions whose next-token distribution is read: the LM head's rows


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
            lengths = [
                len(tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"])
                for choice in row.get("choices") or []
            ]
            # every choice's tokens run after the prompt; the prompt's last state predicts all their
            # first tokens (one head row), each later token its own row; alone again after BOS
            positions += alone * sum(lengths) + (alone - 1)
            scored += alone * (1 + sum(length - 1 for length in lengths))
        work[name] = TaskWork(len(rows), positions, scored)
    return work


def estimate_time(study: Study, tasks: list[str]) -> TimeEstimate | None:
    """The study's wall time on this machine, one cell after another (None for several models)."""
    from cps.data import get_corpus
    from cps.models import load_tokenizer

    models = {cell.prune.model for cell in study.cells}
    if len(models) != 1:
        return None
    (model,) = models
    rates = measured_rates(model, LoadOptions(study.cells[0].prune.dtype, "cpu"))
    tokenizer = load_tokenizer(model)

    def tokens(corpus: str, data_dir: str | None, langs: tuple[str, ...], documents: int | None) -> int:
        text = get_corpus(corpus, data_dir)
        return sum(
            len(tokenizer(doc.text)["input_ids"])
            for lang in langs
            for doc in text.documents(lang)[:documents]
        )

    evaluate = study.evaluate
    held_out = tokens(evaluate.corpus, evaluate.data_dir, evaluate.langs, evaluate.max_docs)
    limits = {name: evaluate.limit_for(name) for name in tasks}
    work = task_work(tasks, evaluate.data_dir, tokenizer, limits).values()
    task_s = rates.seconds(sum(w.positions for w in work), sum(w.scored for w in work))
    per_eval = (
        COSTS["eval_fixed_s"] + COSTS["held_out"] * rates.seconds(held_out, held_out) + COSTS["task"] * task_s
    )
    prune = evaluation = 0.0
    generated = set()  # self-generated calibration sets: sampled once, then cached
    for cell in study.cells:
        calibration = cell.prune.calibration
        if calibration is not None:
            calib_tokens = calibration.nsamples * calibration.seqlen
            prune += COSTS["prune_fixed_s"] + _passes(cell.prune) * rates.seconds(calib_tokens, 0)
            if is_self(calibration.corpus) and calibration not in generated:
                generated.add(calibration)
                batches = -(-calibration.nsamples // BATCH_WINDOWS)
                prune += COSTS["selfgen_step_s"] * calibration.seqlen * batches * len(calibration.mixture)
        evaluation += per_eval
    analyses = 0.0
    pruned = [cell for cell in study.cells if cell.prune.calibration is not None]
    settings = {
        (c.prune.variant, c.prune.pattern, c.prune.sparsity, c.prune.calibration.corpus) for c in pruned
    }
    members = len(pruned) // max(1, len(settings))
    for config in study.analyses:
        text = (
            tokens(config.corpus, config.data_dir, config.langs, config.max_docs) if config.activations else 0
        )
        per_group = COSTS["analysis_fixed_s"] + COSTS["analysis"] * (members + 1) * rates.seconds(text, 0)
        analyses += per_group * len(settings)
    return TimeEstimate(rates, prune, evaluation, analyses)


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
        testable = items >= LANGUAGE_ITEMS and items * languages >= MIN_ITEMS
        detectable = POWER_Z * math.sqrt(v / (items * languages) + tau2 / languages) if testable else None
        found.append(TaskPower(family, languages, items, detectable))
    return found


def _passes(config: PruneConfig) -> float:
    """A cell's pruning work in dense passes over its calibration tokens: its method (or, after a
    method that reads no X^T X, a GPTQ that does: SparseGPT's cost), OWL's pass, DSnoT's loop."""
    passes = COSTS["prune_passes"].get(config.method_name, 3.0)
    if config.quantizer_name not in (None, config.method_name):
        passes = max(passes, COSTS["prune_passes"][config.quantizer_name])
    if config.allocation == "owl":
        passes += COSTS["owl_passes"]
    if config.refine != "none":
        passes *= COSTS["dsnot_factor"]
    return passes
