"""The evaluation protocol: every held-out document on its own, every window starting with BOS.

1. A document is tokenized without special tokens (T tokens). Documents never see each other.
2. Every window starts with the tokenizer's own leading special tokens, the prefix P (BOS for Gemma,
   Llama-3 and Cohere; nothing for tokenizers that add none, such as SmolLM2's), followed by up to
   C = seqlen - |P| document tokens.
3. Window k holds the document tokens [k * stride, k * stride + C). Tokens an earlier window scored
   are context only, the rest are scored: every document token is scored exactly once, and after
   the first window each scored token sees at least C - stride tokens of its document before it.
4. Without a prefix the document's first token has nothing to be predicted from: it is context only
   and its bytes are not counted. Bits per byte divide by the UTF-8 bytes of exactly the scored text.

For a document that fits one window this is what lm-eval's `loglikelihood_rolling` computes with its
prefix token (BOS) before the document tokens, i.e. `HFLM(add_bos_token=False)`; with
`add_bos_token=True` lm-eval encodes the document with its own BOS after that prefix and scores the
second BOS too. The tests compare both.

Hidden-state statistics (SNR against the dense model, LAPE, LSAR) are taken at the scored positions
as well: each document token once, never at a window's first position (BOS, an attention sink whose
hidden state dwarfs all others, or, without a prefix, the document's first token).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cps.config import PROTOCOL_VERSION, default_stride
from cps.data.calibration import as_tokenizer, special_prefix, tokenizer_fingerprint
from cps.data.corpus import Corpus, Document
from cps.errors import CpsError, first_line
from cps.paths import cache_dir, discard, publish, staging

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Window:
    document: int  # index of the document it belongs to
    input_ids: torch.Tensor  # (L,) prefix + document tokens
    scored: int  # the last `scored` tokens are prediction targets


@dataclass
class HeldOutText:
    """Documents cut into windows, with what each document contributes to the scores."""

    documents: list[Document]
    windows: list[Window]
    tokens: list[int]  # scored tokens per document
    bytes: list[int]  # UTF-8 bytes of the scored text per document
    prefix: list[int]
    seqlen: int
    stride: int

    def fingerprint(self) -> str:
        """Hash of exactly what is scored: the window tokens and their scored counts."""
        digest = hashlib.sha256(json.dumps([self.seqlen, self.stride, self.prefix]).encode())
        for window in self.windows:
            digest.update(f"{window.document}:{window.scored}:".encode())
            digest.update(window.input_ids.numpy().tobytes())
        return digest.hexdigest()[:16]


def protocol(seqlen: int, stride: int | None, prefix: str) -> dict[str, object]:
    """The protocol as logged with every evaluation (the `cps.eval.protocol` tag)."""
    return {
        "version": PROTOCOL_VERSION,
        "unit": "document",
        "prefix": prefix,
        "seqlen": seqlen,
        "stride": stride or default_stride(seqlen),
    }


def prefix_label(tokenizer: PreTrainedTokenizerBase) -> str:
    """'<bos>' (the prefix's tokens as text) or 'none'."""
    prefix = special_prefix(tokenizer)
    return "".join(tokenizer.convert_ids_to_tokens(prefix)) if prefix else "none"


def _document_windows(
    ids: list[int], prefix: list[int], capacity: int, stride: int
) -> list[tuple[list[int], int]]:
    """(window tokens, scored count) of one document of token ids."""
    windows = []
    done = 0 if prefix else 1  # document tokens [0, done) are scored already (or context only)
    begin = 0
    while True:
        end = min(begin + capacity, len(ids))
        if end > done:
            windows.append((prefix + ids[begin:end], end - done))
            done = end
        if end >= len(ids):
            return windows
        begin += stride


def _scored_bytes(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], prefix: list[int]) -> int:
    total = len(text.encode("utf-8"))
    if prefix or not ids:
        return total
    # The first token is context only: count the text after it.
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return len(text[offsets[0][1] :].encode("utf-8"))
    return total - len(tokenizer.decode(ids[:1]).encode("utf-8"))


def held_out_windows(
    documents: list[Document], tokenizer: PreTrainedTokenizerBase, seqlen: int, stride: int | None = None
) -> HeldOutText:
    """Every document as windows of at most `seqlen` tokens (steps 1-4 of the module docstring)."""
    if not documents:
        raise CpsError("no text to evaluate on")
    stride = stride or default_stride(seqlen)
    prefix = special_prefix(tokenizer)
    capacity = seqlen - len(prefix)
    if capacity < 1:
        raise CpsError(f"--seqlen {seqlen} leaves no room after the {len(prefix)} prefix tokens")
    if not 1 <= stride <= capacity:
        raise CpsError(f"--stride must be between 1 and {capacity} for --seqlen {seqlen} (got {stride})")
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    windows, tokens, sizes = [], [], []
    for index, (document, ids) in enumerate(zip(documents, encoded, strict=True)):
        parts = _document_windows(list(ids), prefix, capacity, stride)
        windows += [Window(index, torch.tensor(part, dtype=torch.long), scored) for part, scored in parts]
        tokens.append(sum(scored for _, scored in parts))
        sizes.append(_scored_bytes(tokenizer, document.text, list(ids), prefix) if parts else 0)
    if not windows:
        raise CpsError("the held-out documents hold no token to score")
    return HeldOutText(documents, windows, tokens, sizes, prefix, seqlen, stride)


# ---------------------------------------------------------------------------------------------
# Cache: a streamed evaluation never loads the tokenizer (Gemma-3's holds 0.12 GB) for text that
# the same tokenizer windowed before.

WINDOWS_FORMAT = 1


def cached_windows(
    corpus: Corpus,
    lang: str,
    max_docs: int | None,
    tokenizer: PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase],
    seqlen: int,
    stride: int | None = None,
    fingerprint: str | None = None,
) -> tuple[HeldOutText, str]:
    """`held_out_windows` of the first `max_docs` documents of `lang`, and the prefix label; from
    the cache when this tokenizer windowed exactly this text before. `tokenizer` may be a function
    loading it, with its `fingerprint` known: a hit then never loads it."""
    documents = corpus.documents(lang)[:max_docs]
    if not documents:
        raise CpsError("no text to evaluate on")
    if fingerprint is None:
        tokenizer = as_tokenizer(tokenizer)
        fingerprint = tokenizer_fingerprint(tokenizer)
    key = {
        "format": WINDOWS_FORMAT,
        "protocol": PROTOCOL_VERSION,
        "corpus": corpus.name,
        "content": corpus.fingerprint(lang),
        "documents": len(documents),
        "tokenizer": fingerprint,
        "seqlen": seqlen,
        "stride": stride or default_stride(seqlen),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "windows" / f"{digest}.safetensors"
    if path.is_file():
        try:
            return _read_windows(path, documents)
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            discard(path, first_line(error))
    tokenizer = as_tokenizer(tokenizer)
    text = held_out_windows(documents, tokenizer, seqlen, stride)
    label = prefix_label(tokenizer)
    _write_windows(path, text, label)
    return text, label


def _write_windows(path: Path, text: HeldOutText, label: str) -> None:
    tensors = {
        "input_ids": torch.cat([window.input_ids for window in text.windows]),
        "lengths": torch.tensor([len(window.input_ids) for window in text.windows]),
        "document": torch.tensor([window.document for window in text.windows]),
        "scored": torch.tensor([window.scored for window in text.windows]),
        "tokens": torch.tensor(text.tokens),
        "bytes": torch.tensor(text.bytes),
    }
    metadata = {"prefix": json.dumps(text.prefix), "label": label, "seqlen": str(text.seqlen)}
    metadata["stride"] = str(text.stride)
    path.parent.mkdir(parents=True, exist_ok=True)
    built = staging(path)
    save_file(tensors, str(built), metadata)
    publish(built, path)


def _read_windows(path: Path, documents: list[Document]) -> tuple[HeldOutText, str]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        get = handle.get_tensor
        ids, lengths, document, scored = get("input_ids"), get("lengths"), get("document"), get("scored")
        tokens, sizes = get("tokens").tolist(), get("bytes").tolist()
    if len(tokens) != len(documents) or int(lengths.sum()) != len(ids):
        raise ValueError("the cached windows do not match their documents")
    windows = [
        Window(int(index), part, int(count))
        for part, index, count in zip(torch.split(ids, lengths.tolist()), document, scored, strict=True)
    ]
    prefix = json.loads(metadata["prefix"])
    seqlen, stride = int(metadata["seqlen"]), int(metadata["stride"])
    return HeldOutText(documents, windows, tokens, sizes, prefix, seqlen, stride), metadata["label"]


@dataclass
class Batch:
    """Windows of similar length, right-padded: under causal attention no real token sees padding."""

    rows: list[int]  # window indices, in row order
    input_ids: torch.Tensor  # (b, L)
    scored: torch.Tensor  # (b, L) bool: the token at this position is a prediction target

    @property
    def predicting(self) -> torch.Tensor:
        """(b, L) bool: positions whose logits predict a scored token (one before each target)."""
        before = torch.zeros_like(self.scored)
        before[:, :-1] = self.scored[:, 1:]
        return before


PADDING_SLACK = 0.85  # a row joins a batch if at least this fraction of the batch's longest ...
PADDING_TOKENS = 32  # ... or no more than this many tokens shorter (a forward's fixed cost is larger)


def length_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut into groups of at most `max_tokens` once
    padded to their first (longest) member (rows x longest <= max_tokens, or a single row), each
    member padded by at most 15% of the longest or `PADDING_TOKENS` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        longest = lengths[groups[-1][0]] if groups else 0
        close = lengths[index] >= min(PADDING_SLACK * longest, longest - PADDING_TOKENS)
        if groups and longest * (len(groups[-1]) + 1) <= max_tokens and close:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def batches(windows: list[Window], max_tokens: int = 8192, pad_id: int = 0) -> list[Batch]:
    """Windows sorted by length (longest first) and packed into batches of <= max_tokens (b x L)."""
    result = []
    for rows in length_groups([len(window.input_ids) for window in windows], max_tokens):
        width = len(windows[rows[0]].input_ids)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, index in enumerate(rows):
            window = windows[index]
            length = len(window.input_ids)
            ids[row, :length] = window.input_ids
            scored[row, length - window.scored : length] = True
        result.append(Batch(rows, ids, scored))
    return result
