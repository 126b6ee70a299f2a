"""MKQA (Longpre et al., 2021, arXiv 2007.15207): 10,000 open-domain questions with their answers in
26 languages, the paper's fifth task. Read from `mkqa/mkqa.jsonl` (or the official `mkqa.jsonl.gz`)
in the data dir, in the schema of the official file; without one, streamed from the Hugging Face
dataset `apple/mkqa` (network needed).

An item's gold answers are exactly the official evaluation's: every answer's text (`""` where it
has none: unanswerable and long answers, which then expect no answer) plus its aliases.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, register_corpus
from cps.data.mc4 import probe_hub
from cps.errors import CpsError, first_line

# cps language -> MKQA's code, for the languages both have (MKQA has no Swahili).
MKQA_CODES = {code: code for code in ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "ru", "th", "tr", "vi")}
MKQA_CODES["zh"] = "zh_cn"
HUB_DATASET = "apple/mkqa"


@register_corpus("mkqa")
class MkqaCorpus(Corpus):
    """The official jsonl under `mkqa/` when the data dir has it, else the hub dataset."""

    has_text = False
    optional_folder = True  # the hub serves it when the data dir does not

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._examples: list[dict] | None = None

    def local_file(self) -> Path | None:
        files = (self.root / "mkqa.jsonl", self.root / "mkqa.jsonl.gz")
        return next((path for path in files if path.is_file()), None)

    def languages(self) -> list[str]:
        return sorted(MKQA_CODES)

    def files(self, lang: str) -> list[Path]:
        local = self.local_file()
        return [local] if local else []

    def examples(self) -> list[dict]:
        if self._examples is None:
            local = self.local_file()
            self._examples = _read_jsonl(local) if local else _from_hub()
        return self._examples

    def items(self, lang: str) -> list[dict]:
        """{example_id, question, answers} of every question in `lang`."""
        code = MKQA_CODES[self.require(lang)]
        items = []
        for example in self.examples():
            try:
                answers = [a["text"] or "" for a in example["answers"][code]]
                answers += [alias for a in example["answers"][code] for alias in a.get("aliases", [])]
                question = example["queries"][code]
            except (KeyError, TypeError):
                raise CpsError(f"MKQA example {example.get('example_id')!r} lacks {code!r} data") from None
            items.append(
                {
                    "example_id": str(example["example_id"]),
                    "question": question,
                    "answers": sorted(set(answers)),
                }
            )
        return items

    def size(self, lang: str) -> CorpusSize:
        items = self.items(lang)
        return CorpusSize(len(items), sum(len(item["question"]) for item in items), unit="items")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    examples = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise CpsError(f"{path}:{number}: not JSON ({error.msg})") from None
    if not examples:
        raise CpsError(f"{path} holds no MKQA example")
    return examples


def _from_hub() -> list[dict]:
    try:
        probe_hub()  # fail in seconds offline
        import datasets  # ~2 s to import: only when MKQA comes from the hub

        return list(datasets.load_dataset(HUB_DATASET, split="train", trust_remote_code=True))
    except Exception as error:  # any failure to reach the hub is the same user-facing problem
        raise CpsError(
            f"MKQA: no mkqa/mkqa.jsonl in the data dir and the hub dataset {HUB_DATASET} is unreachable "
            f"({first_line(error)[:160]}); put the official mkqa.jsonl.gz under <data dir>/mkqa/"
        ) from None
