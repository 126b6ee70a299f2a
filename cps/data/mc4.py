"""Multilingual C4 (Xue et al., 2021) streamed through `datasets` — for users with network access."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from urllib.parse import urlparse

from cps.data.corpus import Corpus, CorpusSize, Document, register_corpus
from cps.errors import CpsError, first_line
from cps.languages import LANGUAGES, get_language

DATASET = "allenai/c4"


@register_corpus("mc4")
class Mc4Corpus(Corpus):
    """Streams the `train` split of allenai/c4's multilingual configs; reads documents up to a budget."""

    needs_data_dir = False
    streamed = True

    def languages(self) -> list[str]:
        return sorted(code for code, lang in LANGUAGES.items() if lang.mc4)

    def files(self, lang: str) -> list[Path]:
        return []

    def fingerprint(self, lang: str) -> str:
        # Streamed data cannot be hashed up front; the stream order of a config is fixed.
        return hashlib.sha256(f"{DATASET}/{self.require(lang)}/train".encode()).hexdigest()

    def documents(self, lang: str, max_chars: int | None = None) -> list[Document]:
        config = get_language(self.require(lang)).mc4
        budget = max_chars or 2_000_000
        try:
            probe_hub()  # fail in seconds offline, instead of after minutes of retries
            import datasets  # ~2 s to import: only for this corpus, which only some users read

            stream = datasets.load_dataset(DATASET, config, split="train", streaming=True)
            documents, chars = [], 0
            for row in stream:
                documents.append(Document(f"mc4.{config}.{len(documents)}", row["text"]))
                chars += len(row["text"])
                if chars >= budget:
                    break
        except Exception as error:  # any failure to reach the hub is the same user-facing problem
            reason = first_line(error)
            raise CpsError(
                f"mC4 ({DATASET}, config {config!r}) streams from the Hugging Face hub and needs "
                f"network access, which failed: {reason[:200]}. Offline, use --corpus ntrex or "
                "--corpus textdir:<folder of <lang>.txt files>"
            ) from None
        if not documents:
            raise CpsError(f"mC4 config {config!r} returned no documents")
        return documents

    def size(self, lang: str) -> CorpusSize:
        raise CpsError("mC4 is streamed; its size is not known without downloading it")


def probe_hub(timeout: float = 5.0) -> None:
    from huggingface_hub import constants  # with `datasets`: only for this corpus

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set")
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    with socket.create_connection((url.hostname or "", port), timeout=timeout):
        pass
