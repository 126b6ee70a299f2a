"""What a data dir holds: every (corpus, language) parsed and counted, and what failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cps.data import get_corpus
from cps.data.corpus import CorpusSize
from cps.errors import CpsError
from cps.languages import LANGUAGES, Language
from cps.paths import data_dir

LOCAL_CORPORA = ("ntrex", "flores", "xcopa")


@dataclass
class Inventory:
    root: Path
    sizes: dict[tuple[str, str], CorpusSize] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def languages(self) -> list[Language]:
        present = {code for _, code in self.sizes}
        return [lang for code, lang in LANGUAGES.items() if code in present]

    def cell(self, corpus: str, code: str) -> str:
        if corpus == "mc4":
            return "stream" if LANGUAGES[code].mc4 else "-"
        size = self.sizes.get((corpus, code))
        return str(size) if size else "-"


def inventory(data_dir_override: str | None = None) -> Inventory:
    """Parse every local corpus file under the data dir; unknown language files are problems."""
    found = Inventory(data_dir(data_dir_override))
    for name in LOCAL_CORPORA:
        try:
            corpus = get_corpus(name, found.root)
        except CpsError as error:
            found.problems.append(str(error))
            continue
        for code in corpus.languages():
            if code not in LANGUAGES:
                found.problems.append(f"{name}: file for unknown language {code!r}")
                continue
            try:
                found.sizes[(name, code)] = corpus.size(code)
            except CpsError as error:
                found.problems.append(f"{name} {code}: {error}")
    return found
