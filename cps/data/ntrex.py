"""NTREX-128 (Federmann et al., 2022): 1,997 parallel news sentences in 123 documents — calibration text."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, Document, read_lines, register_corpus
from cps.errors import CpsError

DOCUMENT_IDS = "documents.txt"


@register_corpus("ntrex")
class NtrexCorpus(Corpus):
    """`ntrex/<lang>.txt`, line-aligned across languages; `documents.txt` names each line's document."""

    def languages(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.txt") if p.name != DOCUMENT_IDS)

    def files(self, lang: str) -> list[Path]:
        return [self.root / f"{lang}.txt", self.root / DOCUMENT_IDS]

    def documents(self, lang: str, max_chars: int | None = None) -> list[Document]:
        text_path, ids_path = self.files(self.require(lang))
        lines, doc_ids = read_lines(text_path), read_lines(ids_path)
        if len(lines) != len(doc_ids):
            raise CpsError(
                f"{text_path} has {len(lines)} lines but {ids_path} has {len(doc_ids)}; "
                "NTREX files must be line-aligned"
            )
        # Documents are runs of lines with the same id; the first line of each is its headline.
        pairs = zip(doc_ids, lines, strict=True)
        return [
            Document(doc_id, "\n".join(line for _, line in group))
            for doc_id, group in groupby(pairs, key=lambda pair: pair[0])
        ]

    def size(self, lang: str) -> CorpusSize:
        docs = self.documents(lang)
        return CorpusSize(len(docs), sum(len(d.text) for d in docs))
