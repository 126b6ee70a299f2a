"""A user's own corpus: any folder of `<lang>.txt` files (`--corpus textdir:<path>`).

Blank lines separate documents; a file without blank lines is one document.
"""

from __future__ import annotations

import re
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, Document, read_lines, register_corpus
from cps.languages import LANGUAGES

_BLANK_LINES = re.compile(r"\n\s*\n")


@register_corpus("textdir")
class TextDirCorpus(Corpus):
    needs_data_dir = False

    def languages(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.txt") if p.stem in LANGUAGES)

    def files(self, lang: str) -> list[Path]:
        return [self.root / f"{lang}.txt"]

    def documents(self, lang: str, max_chars: int | None = None) -> list[Document]:
        (path,) = self.files(self.require(lang))
        text = "\n".join(read_lines(path))
        blocks = [block.strip() for block in _BLANK_LINES.split(text)]
        return [Document(f"{path.stem}.{i}", block) for i, block in enumerate(blocks) if block]

    def size(self, lang: str) -> CorpusSize:
        docs = self.documents(lang)
        return CorpusSize(len(docs), sum(len(d.text) for d in docs))
