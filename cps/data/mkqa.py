"""MKQA (Longpre et al., 2021, arXiv 2007.15207): 10,000 open-domain questions with their answers in
26 languages, the paper's fifth task. Read from `mkqa/mkqa.jsonl`, else the official
`mkqa/mkqa.jsonl.gz`, in the data dir; without either, the official file itself is downloaded once
from its release (github.com/apple/ml-mkqa) into the cache (network needed). The Hugging Face
dataset `apple/mkqa` holds no data, only a loading script that downloads this same file, and
`datasets` no longer runs loading scripts.

An item's gold answers are exactly the official evaluation's: every answer's text (`""` where it
has none: unanswerable and long answers, which then expect no answer) plus its aliases.
"""

from __future__ import annotations

import gzip
import json
import shutil
import urllib.request
from pathlib import Path

from cps.data.corpus import Corpus, CorpusSize, register_corpus
from cps.errors import CpsError, first_line
from cps.paths import cache_dir, publish, staging

# cps language -> MKQA's code, for the languages both have (MKQA has no Swahili).
MKQA_CODES = {code: code for code in ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "ru", "th", "tr", "vi")}
MKQA_CODES["zh"] = "zh_cn"
OFFICIAL_URL = "https://github.com/apple/ml-mkqa/raw/main/dataset/mkqa.jsonl.gz"
GZIP_MAGIC = b"\x1f\x8b"


@register_corpus("mkqa")
class MkqaCorpus(Corpus):
    """The official jsonl under `mkqa/` when the data dir has it, else the official release."""

    has_text = False
    optional_folder = True  # the official release serves it when the data dir does not

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._examples: list[dict] | None = None

    def local_file(self) -> Path | None:
        files = (self.root / "mkqa.jsonl", self.root / "mkqa.jsonl.gz")
        return next((path for path in files if path.is_file()), None)

    def languages(self) -> list[str]:
        return sorted(MKQA_CODES)

    def files(self, lang: str) -> list[Path]:
        local = self.local_file() or _cached_file()
        return [local] if local.is_file() else []

    def where(self) -> tuple[str, bool]:
        local = self.local_file() or _cached_file()
        if local.is_file():
            return str(local), True
        return f"{OFFICIAL_URL}, downloaded once at run time (or put it under {self.root})", False

    def examples(self) -> list[dict]:
        if self._examples is None:
            self._examples = _read_jsonl(self.local_file() or _official_file())
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
    """Every example of a JSONL file, gzipped (by its first bytes, whatever its name) or not."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == GZIP_MAGIC
    opener = gzip.open if gzipped else open
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


def _cached_file() -> Path:
    return cache_dir() / "mkqa" / "mkqa.jsonl.gz"


def _official_file(timeout: float = 30.0) -> Path:
    """The official `mkqa.jsonl.gz`, downloaded once into the cache (a whole file or none)."""
    target = _cached_file()
    if target.is_file():
        return target
    partial = staging(target)
    try:
        with urllib.request.urlopen(OFFICIAL_URL, timeout=timeout) as reply, open(partial, "wb") as out:
            shutil.copyfileobj(reply, out)
        _read_jsonl(partial)  # a truncated or wrong download fails here, before it is published
        return publish(partial, target)
    except Exception as error:  # any failure to fetch it is the same user-facing problem
        raise CpsError(
            f"MKQA: no mkqa/mkqa.jsonl(.gz) in the data dir and its official release {OFFICIAL_URL} is "
            f"unreachable ({first_line(error)[:160]}); put the official mkqa.jsonl.gz under <data dir>/mkqa/"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
