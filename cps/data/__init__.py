"""Corpora readers and calibration sampling. `get_corpus('ntrex')`, `get_corpus('textdir:/my/texts')`."""

from __future__ import annotations

from pathlib import Path

from cps.data import flores, mc4, mkqa, ntrex, textdir, xcopa  # noqa: F401  (registers the readers)
from cps.data.corpus import CORPORA, Corpus, CorpusSize, Document
from cps.errors import CpsError
from cps.paths import data_dir

__all__ = ["CORPORA", "Corpus", "CorpusSize", "Document", "get_corpus"]


def get_corpus(spec: str, data_dir_override: str | Path | None = None) -> Corpus:
    """A corpus by name (`ntrex`, `flores`, `xcopa`, `mc4`) or `textdir:<path>`."""
    name, _, argument = spec.partition(":")
    if name not in CORPORA:
        known = ", ".join([*sorted(CORPORA), "textdir:<path>"])
        raise CpsError(f"unknown corpus {spec!r}; known: {known}")
    cls = CORPORA[name]
    if name == "textdir":
        if not argument:
            raise CpsError("textdir needs a folder: --corpus textdir:<path>")
        root = Path(argument).expanduser()
        if not root.is_dir():
            raise CpsError(f"textdir folder {root} does not exist")
        return cls(root.resolve())
    if argument:
        raise CpsError(f"corpus {name!r} takes no argument (got {spec!r})")
    if not cls.needs_data_dir:
        return cls(Path("."))
    if cls.optional_folder:  # the data dir's copy when there is one (MKQA: else its release)
        try:
            return cls(data_dir(data_dir_override) / name)
        except CpsError:
            return cls(Path(name))
    root = data_dir(data_dir_override) / name
    if not root.is_dir():
        raise CpsError(f"corpus {name!r} not found: {root} does not exist")
    return cls(root)
