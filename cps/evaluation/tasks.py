"""Zero-shot tasks through lm-eval on the in-memory model, with an offline task pack.

The pack's task families are YAML files in `cps/evaluation/taskpack/` (prompt, choices, metrics);
each names a builder here that reads its items from the data dir at run time. Task names are
`<family>_<lang>` (`sib_sw`, `flores_next_en`, `xcopa_zh`); a bare family name stands for all the
requested languages that have data. Any other name goes to lm-eval unchanged (belebele_*, mmlu,
xcopa_* from the hub, ...), which needs network access for its data.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import resources
from typing import TYPE_CHECKING, Any

from cps.data import get_corpus
from cps.data.flores import EVAL_SPLITS, FloresCorpus
from cps.data.xcopa import XcopaCorpus
from cps.errors import CpsError, first_line

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
}


@lru_cache(maxsize=1)
def families() -> dict[str, dict[str, Any]]:
    """The task pack: family name -> its YAML (prompt, choices, metrics, builder)."""
    import yaml

    pack = resources.files("cps.evaluation") / "taskpack"
    loaded = {}
    for entry in sorted(pack.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            spec = yaml.safe_load(entry.read_text(encoding="utf-8"))
            loaded[spec["family"]] = spec
    return loaded


def split_task(name: str) -> tuple[str, str] | None:
    """'flores_next_sw' -> ('flores_next', 'sw'); None for names outside the pack."""
    for family in sorted(families(), key=len, reverse=True):
        if name.startswith(family + "_"):
            return family, name[len(family) + 1 :]
    return None


def expand_tasks(specs: list[str], langs: list[str], data_dir: str | None) -> list[str]:
    """Family names become one task per requested language with data; other names stay."""
    names: list[str] = []
    for spec in specs:
        if spec in families():
            builder = BUILDERS[families()[spec]["builder"]]
            present = set(builder.languages(data_dir))
            names += [f"{spec}_{lang}" for lang in langs if lang in present]
        else:
            names.append(spec)
    return list(dict.fromkeys(names))


def _dataset(items: Callable[[], dict[str, list[dict]]], **_: Any) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in items().items()})


def pack_task_config(name: str, data_dir: str | None) -> dict[str, Any]:
    """The lm-eval config of a pack task, its data built from the data dir when lm-eval asks."""
    family, lang = split_task(name) or (None, None)
    if family is None or lang is None:
        raise CpsError(f"{name!r} is not a task of the cps pack")
    spec = families()[family]
    builder = BUILDERS[spec["builder"]]
    if lang not in builder.languages(data_dir):
        raise CpsError(f"task {name}: no {family} data for language {lang!r} in the data dir")
    items = partial(builder.items, lang, data_dir)
    items()  # read and validate now: missing or broken data is a user error before lm-eval runs
    return {**spec["lm_eval"], "task": name, "custom_dataset": partial(_dataset, items)}


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # acc | acc_norm | acc_mutual_info
    value: float
    stderr: float | None
    samples: int


def _standard_task_names() -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


def task_configs(names: list[str], data_dir: str | None) -> list[str | dict[str, Any]]:
    configs: list[str | dict[str, Any]] = []
    standard: set[str] | None = None
    for name in names:
        if split_task(name) is not None:
            configs.append(pack_task_config(name, data_dir))
            continue
        standard = _standard_task_names() if standard is None else standard
        if name not in standard:
            raise CpsError(f"unknown task {name!r}: neither a cps pack task nor an lm-eval task")
        configs.append(name)
    return configs


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    data_dir: str | None = None,
    limit: float | None = None,
    batch_size: int = 8,
) -> list[TaskScore]:
    """Evaluate `names` with lm-eval on the model as it is in memory (no save and reload)."""
    if not names:
        return []
    configs = task_configs(names, data_dir)
    for noisy in ("lm-eval", "lm_eval", "datasets"):  # per-task chatter about custom datasets
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from cps.evaluation.lm import ContinuationLM

    lm = ContinuationLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        # Indexing lm-eval's whole task library takes ~10 s: only when a task comes from it.
        manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs))
        output = simple_evaluate(
            model=lm,
            tasks=configs,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            verbosity="WARNING",
            task_manager=manager,
        )
    except (ConnectionError, OSError, FileNotFoundError) as error:
        raise CpsError(f"lm-eval could not load its task data: {first_line(error)[:200]}") from None
    scores = []
    for task, metrics in output["results"].items():
        samples = output.get("n-samples", {}).get(task, {}).get("effective", 0)
        for metric in ("acc", "acc_norm", "acc_mutual_info"):
            if f"{metric},none" in metrics:
                stderr = metrics.get(f"{metric}_stderr,none")
                stderr = float(stderr) if isinstance(stderr, int | float) else None
                scores.append(TaskScore(task, metric, float(metrics[f"{metric},none"]), stderr, samples))
    return scores


def pack_languages(data_dir: str | None) -> dict[str, list[str]]:
    """Family -> languages with data (for listings)."""
    return {family: BUILDERS[spec["builder"]].languages(data_dir) for family, spec in families().items()}
