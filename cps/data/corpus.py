"""The corpus interface and its registry: every reader is a `Corpus` registered under its module name."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from cps.errors import CpsError
from cps.languages import get_language
from cps.registry import Registry


@dataclass(frozen=True)
class Document:
    """One document (kept whole when sampling): an id unique within the corpus and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class CorpusSize:
    documents: int  # documents, or task items for task corpora
    characters: int
    unit: str = "docs"

    def __str__(self) -> str:
        return f"{self.documents:,} {self.unit}, {self.characters / 1000:,.0f}k chars"


class Corpus(ABC):
    """A source of text (or task items) per language, read from `root`.

    Text corpora implement `documents`; task corpora (XCOPA) only `size` and their own item readers.
    """

    name: ClassVar[str]
    has_text: ClassVar[bool] = True
    needs_data_dir: ClassVar[bool] = True
    optional_folder: ClassVar[bool] = False  # read from the data dir when there, else elsewhere
    streamed: ClassVar[bool] = False

    def __init__(self, root: Path) -> None:
        self.root = root

    @abstractmethod
    def languages(self) -> list[str]:
        """Codes of the languages present."""

    @abstractmethod
    def files(self, lang: str) -> list[Path]:
        """The files that hold `lang` (what the content fingerprint covers)."""

    @abstractmethod
    def size(self, lang: str) -> CorpusSize:
        """Parse everything for `lang` and count it (also the `cps data check` of this corpus)."""

    def documents(self, lang: str, max_chars: int | None = None) -> list[Document]:
        """Whole documents of `lang`, in corpus order. `max_chars` bounds streamed corpora."""
        raise CpsError(f"corpus {self.name!r} holds task items, not text to calibrate or evaluate on")

    def require(self, lang: str) -> str:
        """Validate `lang` and check that this corpus has it; returns the canonical code."""
        code = get_language(lang).code
        if code not in self.languages():
            have = " ".join(self.languages()) or "none"
            raise CpsError(f"corpus {self.name!r} has no {code!r} data under {self.root} (has: {have})")
        return code

    def where(self) -> tuple[str, bool]:
        """Where this corpus's data comes from and whether it is on this machine (a dry run says
        both without reading the data)."""
        return str(self.root), self.root.is_dir()

    def fingerprint(self, lang: str) -> str:
        """Content hash of everything this corpus reads for `lang`."""
        digest = hashlib.sha256(self.name.encode())
        for path in self.files(self.require(lang)):
            digest.update(file_sha256(path).encode())
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CpsError(f"missing data file {path}") from None
    except UnicodeDecodeError as error:
        raise CpsError(f"{path} is not UTF-8 text: {error}") from None


CORPORA: Registry[Corpus] = Registry()
register_corpus = CORPORA.register
