"""XCOPA causal commonsense reasoning (Ponti et al., 2020): the items behind lm-eval's `xcopa_*` tasks."""

from __future__ import annotations

import json
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, read_lines, register_corpus
from cps.errors import CpsError

FIELDS = ("premise", "choice1", "choice2", "question", "label")
XCOPA_SPLITS = ("val", "test")


@register_corpus("xcopa")
class XcopaCorpus(Corpus):
    """`xcopa/{val,test}.<lang>.jsonl`; a task corpus with no calibration text."""

    has_text = False

    def languages(self) -> list[str]:
        return sorted({p.name.split(".")[1] for p in self.root.glob("test.*.jsonl")})

    def files(self, lang: str) -> list[Path]:
        return [self.root / f"{split}.{lang}.jsonl" for split in XCOPA_SPLITS]

    def items(self, lang: str, split: str = "test") -> list[dict]:
        if split not in XCOPA_SPLITS:
            raise CpsError(f"unknown XCOPA split {split!r}; use one of {', '.join(XCOPA_SPLITS)}")
        path = self.root / f"{split}.{self.require(lang)}.jsonl"
        items = []
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise CpsError(f"{path}:{number}: not JSON ({error.msg})") from None
            missing = [field for field in FIELDS if field not in item]
            if missing or item["question"] not in ("cause", "effect") or item["label"] not in (0, 1):
                raise CpsError(f"{path}:{number}: malformed XCOPA item (missing {missing})")
            items.append(item)
        return items

    def size(self, lang: str) -> CorpusSize:
        items = [item for split in XCOPA_SPLITS for item in self.items(lang, split)]
        chars = sum(len(item["premise"]) + len(item["choice1"]) + len(item["choice2"]) for item in items)
        return CorpusSize(len(items), chars, unit="items")
