"""FLORES-200 sentences with SIB-200 topic labels (Adelani et al., 2024) — held-out evaluation text.

SIB `dev` and `test` rows are the evaluation split; `train` rows are reserved for task prompts
(few-shot examples, label descriptions) and never evaluated on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, Document, read_lines, register_corpus
from cps.errors import CpsError

COLUMNS = ("flores_id", "sib_split", "topic", "text")
SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")


@dataclass(frozen=True)
class FloresRow:
    flores_id: int
    split: str
    topic: str
    text: str


@register_corpus("flores")
class FloresCorpus(Corpus):
    """`flores/<lang>.tsv` with columns flores_id, sib_split, topic, text; parallel by flores_id."""

    def languages(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.tsv"))

    def files(self, lang: str) -> list[Path]:
        return [self.root / f"{lang}.tsv"]

    def rows(self, lang: str, splits: tuple[str, ...] = SPLITS) -> list[FloresRow]:
        """Rows of the given SIB splits, in flores_id order."""
        (path,) = self.files(self.require(lang))
        lines = read_lines(path)
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if tuple(header or ()) != COLUMNS:
            raise CpsError(f"{path}: expected columns {', '.join(COLUMNS)}, found {header}")
        rows = []
        for number, fields in enumerate(reader, start=2):
            if len(fields) != len(COLUMNS) or fields[1] not in SPLITS or not fields[0].isdigit():
                raise CpsError(f"{path}:{number}: malformed row {fields[:3]}")
            row = FloresRow(int(fields[0]), fields[1], fields[2], fields[3])
            if row.split in splits:
                rows.append(row)
        return sorted(rows, key=lambda row: row.flores_id)

    def documents(self, lang: str, max_chars: int | None = None) -> list[Document]:
        """Evaluation text (dev + test): runs of consecutive flores_ids, which mostly follow one article."""
        documents: list[list[FloresRow]] = []
        for row in self.rows(lang, EVAL_SPLITS):
            if documents and documents[-1][-1].flores_id == row.flores_id - 1:
                documents[-1].append(row)
            else:
                documents.append([row])
        return [
            Document(f"flores.{rows[0].flores_id}", "\n".join(r.text for r in rows)) for rows in documents
        ]

    def size(self, lang: str) -> CorpusSize:
        rows = self.rows(lang, EVAL_SPLITS)
        return CorpusSize(len(rows), sum(len(r.text) for r in rows), unit="eval sents")
