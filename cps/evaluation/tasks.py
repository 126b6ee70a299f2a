"""Zero-shot tasks through lm-eval on the in-memory model, with an offline task pack.

The pack's task families are YAML files in `cps/evaluation/taskpack/` (prompt, choices, metrics);
each names a builder here that reads its items from the data dir at run time. Task names are
`<family>_<lang>` (`sib_sw`, `flores_next_en`, `xcopa_zh`); a bare family name stands for all the
requested languages that have data. Any other name goes to lm-eval unchanged (belebele_*, mmlu,
xcopa_* from the hub, ...), which needs network access for its data.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import resources
from typing import TYPE_CHECKING, Any

import polars as pl
import yaml

from cps.config import EvalConfig
from cps.data import get_corpus
from cps.data.flores import EVAL_SPLITS, FloresCorpus
from cps.data.mkqa import MKQA_CODES, MkqaCorpus
from cps.data.xcopa import XcopaCorpus
from cps.errors import CpsError, first_line
from cps.evaluation import mkqa
from cps.languages import Language, get_language
from cps.metrics import BINARY, MARGINS, SCORES, split_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SIB_TOPICS = (
    "science/technology",
    "travel",
    "politics",
    "sports",
    "health",
    "entertainment",
    "geography",
)

# lm-eval's xcopa connectors (lm_eval/tasks/xcopa/utils.py): "because" / "therefore".
XCOPA_CONNECTORS = {
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "it": ("perché", "quindi"),
    "id": ("karena", "maka"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "zh": ("因为", "所以"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
}


# ---------------------------------------------------------------------------------------------
# Builders: items of one family and language, read from the data dir


def _xcopa_items(lang: str, data_dir: str | None) -> dict[str, list[dict]]:
    corpus: XcopaCorpus = get_corpus("xcopa", data_dir)  # type: ignore[assignment]
    because, therefore = XCOPA_CONNECTORS[lang]

    def item(raw: dict) -> dict:
        connector = because if raw["question"] == "cause" else therefore
        lower = [raw[key][0].lower() + raw[key][1:] for key in ("choice1", "choice2")]
        return {
            "text": raw["premise"].strip()[:-1] + f" {connector}",
            "choices": lower,
            "label": raw["label"],
        }

    return {
        "validation": [item(raw) for raw in corpus.items(lang, "val")],
        "test": [item(raw) for raw in corpus.items(lang, "test")],
    }


def _sib_items(lang: str, data_dir: str | None) -> dict[str, list[dict]]:
    corpus: FloresCorpus = get_corpus("flores", data_dir)  # type: ignore[assignment]
    rows = corpus.rows(lang, EVAL_SPLITS)
    unknown = {row.topic for row in rows} - set(SIB_TOPICS)
    if unknown:
        raise CpsError(f"flores {lang}: unknown SIB topics {sorted(unknown)}")
    return {
        "test": [
            {"text": row.text, "choices": list(SIB_TOPICS), "label": SIB_TOPICS.index(row.topic)}
            for row in rows
        ]
    }


def _flores_next_items(lang: str, data_dir: str | None) -> dict[str, list[dict]]:
    corpus: FloresCorpus = get_corpus("flores", data_dir)  # type: ignore[assignment]
    rows = {row.flores_id: row for row in corpus.rows(lang, EVAL_SPLITS)}
    ids = sorted(rows)
    items = []
    for flores_id in ids:
        if flores_id + 1 not in rows:
            continue
        # distractors: same language, away from this article's neighbourhood, fixed by flores_id
        pool = [other for other in ids if not flores_id - 2 <= other <= flores_id + 3]
        picker = random.Random(flores_id)
        candidates = [flores_id + 1, *picker.sample(pool, 3)]
        picker.shuffle(candidates)
        items.append(
            {
                "context": rows[flores_id].text,
                "choices": [rows[c].text for c in candidates],
                "label": candidates.index(flores_id + 1),
            }
        )
    return {"test": items}


def _mkqa_items(lang: str, data_dir: str | None) -> dict[str, list[dict]]:
    corpus: MkqaCorpus = get_corpus("mkqa", data_dir)  # type: ignore[assignment]
    return {"test": corpus.items(lang)}


def _mkqa_results(doc: dict[str, Any], results: list[str], lang: str) -> dict[str, float]:
    """lm-eval's per-item hook: the greedy answer scored MKQA's way."""
    return mkqa.scores(results[0].strip(), doc["answers"], MKQA_CODES[lang])


SCORERS: dict[str, Callable[..., dict[str, float]]] = {"mkqa": _mkqa_results}


@dataclass(frozen=True)
class Builder:
    items: Callable[[str, str | None], dict[str, list[dict]]]
    corpus: str  # which corpus decides the languages
    supported: frozenset[str] | None = None  # languages the prompt exists for (None: all)

    def languages(self, data_dir: str | None) -> list[str]:
        codes = get_corpus(self.corpus, data_dir).languages()
        return [code for code in codes if self.supported is None or code in self.supported]


BUILDERS = {
    "xcopa": Builder(_xcopa_items, "xcopa", frozenset(XCOPA_CONNECTORS)),
    "sib": Builder(_sib_items, "flores"),
    "flores_next": Builder(_flores_next_items, "flores"),
    "mkqa": Builder(_mkqa_items, "mkqa"),
}


@lru_cache(maxsize=1)
def families() -> dict[str, dict[str, Any]]:
    """The task pack: family name -> its YAML (prompt, choices, metrics, builder)."""

    pack = resources.files("cps.evaluation") / "taskpack"
    loaded = {}
    for entry in sorted(pack.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            spec = yaml.safe_load(entry.read_text(encoding="utf-8"))
            loaded[spec["family"]] = spec
    return loaded


def pack_family(name: str) -> str | None:
    """The pack family of a task name ('flores_next_sw' -> 'flores_next'), None outside the pack."""
    family, lang = split_task(name)
    return family if lang is not None and family in families() else None


# The paper's task suite (arXiv 2408.14398): per family, the lm-eval tasks that may hold a language,
# in order of preference. Which exist is read from the installed lm-eval's index, never assumed.
SUITE: dict[str, Callable[[Language], list[str]]] = {
    "belebele": lambda lang: [f"belebele_{lang.flores}"],
    "mmlu": lambda lang: (
        [f"global_mmlu_full_{lang.code}", f"global_mmlu_{lang.code}"]
        + (["mmlu"] if lang.code == "en" else [])
    ),
    "arc": lambda lang: ["arc_challenge"] if lang.code == "en" else [f"arc_{lang.code}"],  # okapi
    "hellaswag": lambda lang: ["hellaswag"] if lang.code == "en" else [f"hellaswag_{lang.code}"],  # okapi
}


PAPER_FAMILIES = (*SUITE, "mkqa")  # the paper's five task families


def expand_tasks(
    specs: list[str], langs: list[str], data_dir: str | None, skip_missing: bool = False
) -> list[str]:
    """Family names become one task `<family>_<lang>` per requested language: a pack family where
    its data holds the language, a suite family where lm-eval has a task for it. One rule for both:
    a (family, language) pair with no task fails in one line naming every such pair, or is left out
    with `skip_missing` (`missing_tasks` lists them, for the caller to say). Other names stay as
    they are (any lm-eval task)."""
    names, missing = _pairs(specs, langs, data_dir)
    if missing and not skip_missing:
        raise CpsError(
            f"no task for {', '.join(missing)}; --skip-missing (a study: [eval] skip_missing = true) "
            "evaluates the rest"
        )
    return list(dict.fromkeys(names))


def missing_tasks(specs: list[str], langs: list[str], data_dir: str | None) -> list[str]:
    """The (family, language) pairs asked for that have no task: `xcopa_de` (XCOPA has no German),
    `arc_sw` (lm-eval has no Swahili ARC)."""
    return _pairs(specs, langs, data_dir)[1]


def _pairs(specs: list[str], langs: list[str], data_dir: str | None) -> tuple[list[str], list[str]]:
    """The task names `specs` expand to, and the (family, language) pairs that have no task."""
    names: list[str] = []
    missing: list[str] = []
    for spec in specs:
        if spec not in families() and spec not in SUITE:
            names.append(spec)
            continue
        present = None if spec in SUITE else BUILDERS[families()[spec]["builder"]].languages(data_dir)
        for lang in langs:
            name = f"{spec}_{lang}"
            found = suite_task(name) is not None if present is None else lang in present
            (names if found else missing).append(name)
    return names, missing


def suite_task(name: str) -> str | None:
    """The installed lm-eval task (or group) that holds a suite pair ('belebele_sw' ->
    'belebele_swh_Latn'); None when there is none, or `name` is no suite pair."""
    family, lang = split_task(name)
    if family not in SUITE or lang is None:
        return None
    index = _standard_task_names()
    return next((task for task in SUITE[family](get_language(lang)) if task in index), None)


def _dataset(items: Callable[[], dict[str, list[dict]]], **_: Any) -> Any:
    import datasets  # ~2 s to import: only once lm-eval asks for a pack task's data

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in items().items()})


def _first_items(
    items: Callable[[], dict[str, list[dict]]], split: str, limit: float
) -> dict[str, list[dict]]:
    """`items` with the split lm-eval evaluates cut to its first `limit` items (a fraction when
    below 1, rounded up): exactly the items lm-eval's own `limit` would evaluate."""
    everything = items()
    rows = everything[split]
    count = math.ceil(len(rows) * limit) if limit < 1.0 else int(limit)
    return {**everything, split: rows[:count]}


def pack_task_config(
    name: str, data_dir: str | None, limit: float | None = None, read: bool = True
) -> dict[str, Any]:
    """The lm-eval config of a pack task, its data built from the data dir when lm-eval asks;
    with `limit`, only the items lm-eval's `limit` would evaluate (so that tasks of different
    limits run in one lm-eval call, their requests scored together). `read=False` (a dry run)
    checks the name and language without reading the task's data."""
    family, lang = split_task(name)
    if pack_family(name) is None or lang is None:
        raise CpsError(f"{name!r} is not a task of the cps pack")
    spec = families()[family]
    builder = BUILDERS[spec["builder"]]
    if lang not in builder.languages(data_dir):
        raise CpsError(f"task {name}: no {family} data for language {lang!r} in the data dir")
    items = partial(builder.items, lang, data_dir)
    if read:  # read and validate now: missing or broken data is a user error before lm-eval runs
        items()
    if limit is not None:
        lm_eval_config = spec["lm_eval"]
        split = lm_eval_config.get("test_split") or lm_eval_config["validation_split"]
        items = partial(_first_items, items, split, limit)
    config = {**spec["lm_eval"], "task": name, "custom_dataset": partial(_dataset, items)}
    if "scorer" in spec:  # a family scored by cps's own per-item function (MKQA's metrics)
        config["process_results"] = partial(SCORERS[spec["scorer"]], lang=lang)
    return config


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # acc | acc_norm | acc_mutual_info | exact_match | f1
    value: float
    stderr: float | None
    samples: int
    ci_low: float | None  # 95% interval over the items: Wilson (0/1 scores), Student t (margins)
    ci_high: float | None


@dataclass
class TaskResults:
    scores: list[TaskScore]
    items: dict[str, pl.DataFrame]  # task -> one row per item (`items/<task>.parquet`)


def wilson_interval(successes: float, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (nan, nan) without trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    spread = z * z / trials
    center = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / trials + spread / (4 * trials)) / (1 + spread)
    low = 0.0 if successes <= 0 else max(0.0, center - half)  # exact at the ends, not 1e-17 off
    high = 1.0 if successes >= trials else min(1.0, center + half)
    return low, high


def t_interval(mean: float, stderr: float | None, n: int) -> tuple[float | None, float | None]:
    """The Student t 95% interval of a mean from its standard error over n items."""
    if stderr is None or n < 2:
        return None, None
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * stderr
    return mean - half, mean + half


@lru_cache(maxsize=1)
def _standard_task_names() -> frozenset[str]:
    # lm-eval takes seconds to import (and ~10 s to index its tasks): only when a name needs it
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def task_configs(
    names: list[str],
    data_dir: str | None,
    limits: Mapping[str, float | None] | None = None,
    read: bool = True,
) -> list[str | dict[str, Any]]:
    """lm-eval's config for each name: a pack task's own (its items cut to `limits[name]`), else
    the name of an lm-eval task (from lm-eval's index: no dataset is loaded). `read=False`: no
    pack task's data is read either."""
    configs: list[str | dict[str, Any]] = []
    standard: frozenset[str] | None = None
    for name in names:
        if pack_family(name) is not None:
            configs.append(pack_task_config(name, data_dir, (limits or {}).get(name), read))
            continue
        resolved = suite_task(name)
        if resolved is not None:
            configs.append(resolved)
            continue
        standard = _standard_task_names() if standard is None else standard
        if name not in standard:
            raise CpsError(f"unknown task {name!r}: neither a cps pack task nor an lm-eval task")
        configs.append(name)
    return configs


def _leaf_tasks(tree: Mapping[Any, Any]) -> dict[str, Any]:
    """lm-eval's task dict (groups nest) flattened to task name -> Task."""
    found: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found |= _leaf_tasks(value)
        else:
            found[str(key)] = value
    return found


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def margin(scores: list[float], gold: int) -> float | None:
    """How far the gold choice's score lies above the best other choice's (nats for
    log-likelihoods): positive when the item is answered right, and by how much. None without a
    gold choice among at least two."""
    if not 0 <= gold < len(scores) or len(scores) < 2:
        return None
    return scores[gold] - max(score for index, score in enumerate(scores) if index != gold)


def item_frame(name: str, task: Any, samples: list[dict[str, Any]]) -> pl.DataFrame:
    """One row per item: its id, language, target and lm-eval's per-item metrics; for multiple
    choice also the choices, each choice's log-likelihood (and the unconditional one for
    acc_mutual_info), the choice each metric picked, enough to recompute every accuracy, and the
    gold choice's margin over the best other under each metric's score (`margin`: log-likelihood,
    nats; `margin_norm`: per character, as acc_norm; `margin_mutual_info`: minus the unconditional
    log-likelihood, as acc_mutual_info)."""

    lang = split_task(name)[1]
    rows = []
    first_filter = samples[0].get("filter") if samples else None
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        if sample.get("filter") != first_filter:
            continue
        row: dict[str, Any] = {"task": name, "item": int(sample["doc_id"]), "lang": lang}
        target = sample.get("target")
        row["target"] = int(target) if isinstance(target, int) else -1
        if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice":
            choices = [str(c) for c in task.doc_to_choice(sample["doc"])]
            loglik = [float(response[0]) for response in sample["filtered_resps"]]
            conditional = loglik[: len(choices)]
            unconditional = loglik[len(choices) :] or None
            row |= {"choices": choices, "loglik": conditional, "loglik_unconditional": unconditional}
            gold = row["target"]
            normalised = [ll / len(c) for ll, c in zip(conditional, choices, strict=True)]
            row["chosen"] = _argmax(conditional)
            row["chosen_norm"] = _argmax(normalised)
            row["margin"] = margin(conditional, gold)
            row["margin_norm"] = margin(normalised, gold)
            if unconditional:
                mutual_info = [c - u for c, u in zip(conditional, unconditional, strict=True)]
                row["chosen_mutual_info"] = _argmax(mutual_info)
                row["margin_mutual_info"] = margin(mutual_info, gold)
        elif getattr(task, "OUTPUT_TYPE", None) == "generate_until":
            response = (sample.get("filtered_resps") or [""])[0]
            row["response"] = response if isinstance(response, str) else str(response)
            if isinstance(sample.get("doc"), dict) and "answers" in sample["doc"]:
                row["answers"] = [str(answer) for answer in sample["doc"]["answers"]]
        for metric in sample.get("metrics", []):
            value = sample.get(metric)
            if isinstance(value, int | float):
                row[metric] = float(value)
        row["correct"] = bool(row.get("acc", row.get("exact_match", 0.0)))
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def check_eval_inputs(config: EvalConfig, read_tasks: bool = True) -> tuple[list[str], list[str]]:
    """Everything of an evaluation a user can get wrong, before any model is loaded: its languages
    (held-out text present) and its task names, expanded (task data present and readable, unless
    `read_tasks=False`: a dry run plans without reading task data, `task_data` says where it is)."""
    corpus = get_corpus(config.corpus, config.data_dir)
    langs = [corpus.require(lang) for lang in config.langs]
    task_names = expand_tasks(list(config.tasks), langs, config.data_dir, config.skip_missing)
    task_configs(task_names, config.data_dir, read=read_tasks)
    return langs, task_names


@dataclass(frozen=True)
class TaskData:
    """Where the data of one task family comes from, and whether it is on this machine now."""

    family: str
    tasks: tuple[str, ...]
    source: str
    here: bool | None  # None: lm-eval fetches (or finds in its cache) the dataset at run time


def task_data(names: list[str], data_dir: str | None) -> list[TaskData]:
    """The data each task will need, per family, read from nothing but the file system."""
    by_family: dict[str, list[str]] = {}
    for name in names:
        by_family.setdefault(pack_family(name) or split_task(name)[0], []).append(name)
    found = []
    for family, tasks in by_family.items():
        if family in families():
            source, here = get_corpus(BUILDERS[families()[family]["builder"]].corpus, data_dir).where()
        else:
            resolved = sorted({suite_task(name) or name for name in tasks})
            source, here = f"lm-eval's dataset of {', '.join(resolved)}, at run time", None
        found.append(TaskData(family, tuple(tasks), source, here))
    return found


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    data_dir: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    limits: Mapping[str, float | None] | None = None,
) -> TaskResults:
    """Evaluate `names` with lm-eval on the model as it is in memory (no save and reload), each
    task on its first `limits[name]` items (default `limit`; None: all). The pack's tasks run in
    one lm-eval call whatever their limits (their items are cut beforehand), so their requests are
    scored together; other lm-eval tasks run in one call per distinct limit."""
    if not names:
        return TaskResults([], {})
    wanted = {name: (limits or {}).get(name, limit) for name in names}
    calls: dict[float | None, dict[str, str | dict[str, Any]]] = {}
    for name, config in zip(names, task_configs(names, data_dir, wanted), strict=True):
        calls.setdefault(None if isinstance(config, dict) else wanted[name], {})[name] = config
    for noisy in ("lm-eval", "lm_eval", "datasets"):  # per-task chatter about custom datasets
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # lm-eval takes seconds to import: only when tasks run, not for listing or checking them
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from cps.evaluation.lm import SharedContextLM

    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    samples: dict[str, list[dict[str, Any]]] = {}
    leaves: dict[str, dict[str, Any]] = {}
    try:
        for call_limit, configs in calls.items():
            # Indexing lm-eval's whole task library takes ~10 s: only when a task comes from it.
            manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs.values()))
            # each name's leaf tasks (a group such as global_mmlu_full_sw has many), kept: items
            # need each task's choices
            these = {name: _leaf_tasks(get_task_dict([config], manager)) for name, config in configs.items()}
            with _without_environment_report():
                output = simple_evaluate(
                    model=lm,
                    tasks=[task for tasks in these.values() for task in tasks.values()],
                    limit=call_limit,
                    log_samples=True,
                    bootstrap_iters=0,
                    verbosity="WARNING",
                    task_manager=manager,
                )
            samples |= output.get("samples", {})
            leaves |= these
    except (ConnectionError, OSError, FileNotFoundError) as error:
        raise CpsError(f"lm-eval could not load its task data: {first_line(error)[:200]}") from None
    return collect(samples, {name: leaves[name] for name in names})


@contextmanager
def _without_environment_report() -> Iterator[None]:
    """lm-eval ends each call by describing the machine (torch's collect_env: pip, git and
    compiler subprocesses, ~0.3 s, and a "fatal: not a git repository" on stderr outside a git
    checkout); cps keeps only the samples and records its own environment on the run."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


def collect(
    samples: Mapping[str, list[dict[str, Any]]], leaves: Mapping[str, Mapping[str, Any]]
) -> TaskResults:
    """Per cps task name: its items (the samples of all its leaf tasks, numbered one after another
    in leaf-name order) and its accuracies and margins computed from them: the mean over items (a
    group's accuracy weighted by its tasks' sizes), lm-eval's standard error of a mean, Wilson
    intervals for accuracies, Student t intervals for margins."""
    items: dict[str, pl.DataFrame] = {}
    for name, tasks in leaves.items():
        frames, offset = [], 0
        for leaf in sorted(tasks):
            if samples.get(leaf):
                frame = item_frame(name, tasks[leaf], samples[leaf])
                frames.append(frame.with_columns(pl.col("item") + offset))
                offset += int(frame["item"].max()) + 1
        if frames:
            items[name] = pl.concat(frames, how="diagonal_relaxed")
    scores = []
    for name, frame in items.items():
        for metric in SCORES:
            if metric in frame.columns:
                values = frame[metric].drop_nulls().to_list()
                if not values:
                    continue
                n = len(values)
                value = sum(values) / n
                stderr = math.sqrt(sum((v - value) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
                if metric in BINARY:
                    low, high = wilson_interval(sum(values), n)
                elif metric in MARGINS:
                    low, high = t_interval(value, stderr, n)
                else:
                    low, high = None, None
                scores.append(TaskScore(name, metric, value, stderr, n, low, high))
    return TaskResults(scores, items)


def pack_languages(data_dir: str | None) -> dict[str, list[str]]:
    """Family -> languages with data (for listings)."""
    return {family: BUILDERS[spec["builder"]].languages(data_dir) for family, spec in families().items()}
