"""Calibration sets: random token windows from a language's documents (or a mixture of languages).

Each language's documents are tokenized one by one (no special tokens) and joined with the tokens
of a blank line into one stream. A window is `seqlen` tokens: the tokenizer's BOS (when it adds one
by default, as Gemma and Llama-3 do) followed by `seqlen - 1` stream tokens, else `seqlen` stream
tokens. When the stream holds enough tokens the windows are random and disjoint; otherwise they are
drawn uniformly with overlap and the coverage (the share of stream tokens used at least once) says
how much of the corpus they saw. With `--corpus self` the windows are text the dense model samples
itself instead (`cps.data.selfgen`). Results are cached under the cache dir by a content hash of
everything that determines them (for self-generated text: the model too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cps.config import CalibrationConfig
from cps.data import CORPORA, get_corpus
from cps.data.corpus import Corpus, Document, file_sha256
from cps.data.selfgen import (
    PROMPT_CORPUS,
    PROMPT_TOKENS,
    SAMPLING,
    SELF_CORPUS,
    SELFGEN_VERSION,
    generate_windows,
    is_self,
    model_fingerprint,
    prompt_documents,
    prompt_fingerprint,
)
from cps.errors import CpsError, first_line
from cps.languages import mixture_label, mixture_spec
from cps.models import LoadOptions, load_model
from cps.paths import cache_dir, discard, publish, staging
from cps.streaming import wants_stream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the sampling changes: old cache entries stop matching
DOCUMENT_SEPARATOR = "\n\n"


def window_counts(mixture: dict[str, float], nsamples: int) -> dict[str, int]:
    """Split nsamples by the mixture's proportions (largest remainder, ties in mixture order)."""
    exact = {code: share * nsamples for code, share in mixture.items()}
    counts = {code: int(value) for code, value in exact.items()}
    by_remainder = sorted(exact, key=lambda code: -(exact[code] - counts[code]))
    for code in by_remainder[: nsamples - sum(counts.values())]:
        counts[code] += 1
    return counts


@dataclass
class LanguageStats:
    windows: int
    corpus_tokens: int
    corpus_characters: int
    corpus_documents: int
    documents_used: int
    characters_used: int
    tokens_covered: int  # distinct stream positions inside at least one window
    overlapping: bool

    @property
    def coverage(self) -> float:
        return self.tokens_covered / self.corpus_tokens


# (language, windows wanted) -> the language's windows [count, seqlen] and their statistics.
Sampler = Callable[[str, int], tuple[torch.Tensor, LanguageStats]]


@dataclass
class CalibrationSet:
    """`input_ids` [nsamples, seqlen] (int64) and the language of each window."""

    config: CalibrationConfig
    input_ids: torch.Tensor
    window_langs: list[str]
    stats: dict[str, LanguageStats]
    calib_hash: str
    cache_path: Path
    cache_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def calib_lang(self) -> str:
        return mixture_label(self.config.mixture)

    def summary_metrics(self) -> dict[str, float]:
        """Metrics for the tracking store: totals, and per language for mixtures."""
        stats = list(self.stats.values())
        corpus_tokens = sum(s.corpus_tokens for s in stats)
        metrics = {
            "calib.tokens": float(self.input_ids.numel()),
            "calib.windows": float(self.input_ids.shape[0]),
            "calib.corpus_tokens": float(corpus_tokens),
            "calib.corpus_documents": float(sum(s.corpus_documents for s in stats)),
            "calib.documents_used": float(sum(s.documents_used for s in stats)),
            "calib.characters_used": float(sum(s.characters_used for s in stats)),
            "calib.coverage": sum(s.tokens_covered for s in stats) / corpus_tokens,
        }
        if len(self.stats) > 1:
            for code, s in self.stats.items():
                metrics[f"calib.windows.{code}"] = float(s.windows)
                metrics[f"calib.coverage.{code}"] = s.coverage
        return metrics


# ---------------------------------------------------------------------------------------------
# Sampling


def token_stream(
    documents: list[Document], tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one token stream, and the index of the document each token came from."""

    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    encoded = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    pieces, owners = [], []
    for index, ids in enumerate(encoded):
        piece = ids + separator if index < len(encoded) - 1 else ids
        pieces.append(torch.tensor(piece, dtype=torch.long))
        owners.append(torch.full((len(piece),), index, dtype=torch.long))
    return torch.cat(pieces), torch.cat(owners)


def sample_starts(
    stream_length: int, count: int, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, bool]:
    """Start offsets of `count` windows of `width` tokens; disjoint whenever the stream allows.

    Disjoint placement: draw the free tokens before each window as sorted uniform cut points of
    the slack, so every arrangement of disjoint windows is possible. Returns (starts, overlapping).
    """

    if stream_length < width:
        raise CpsError(
            f"the corpus holds only {stream_length} tokens, fewer than one window of {width}; lower --seqlen"
        )
    slack = stream_length - count * width
    if slack >= 0:
        cuts = torch.sort(torch.randint(0, slack + 1, (count,), generator=generator)).values
        starts = cuts + torch.arange(count) * width
        return starts[torch.randperm(count, generator=generator)], False
    return torch.randint(0, stream_length - width + 1, (count,), generator=generator), True


def _language_generator(seed: int, code: str) -> torch.Generator:

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(code.encode()))


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before any text by default ([BOS] for Gemma, Llama-3
    and Cohere; [] for tokenizers that add none, such as SmolLM2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and special_prefix(tokenizer)[:1] == [bos]


def _sample_language(
    documents: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    config: CalibrationConfig,
    code: str,
) -> tuple[torch.Tensor, LanguageStats]:

    if not documents:
        raise CpsError(f"corpus {config.corpus!r} has no {code!r} text")
    stream, owners = token_stream(documents, tokenizer)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    width = config.seqlen - len(bos)
    starts, overlapping = sample_starts(len(stream), count, width, _language_generator(config.seed, code))
    positions = starts[:, None] + torch.arange(width)  # [count, width]
    windows = torch.cat([torch.tensor(bos, dtype=torch.long).expand(count, -1), stream[positions]], 1)
    used_docs = torch.unique(owners[positions])
    stats = LanguageStats(
        windows=count,
        corpus_tokens=len(stream),
        corpus_characters=sum(len(d.text) for d in documents),
        corpus_documents=len(documents),
        documents_used=len(used_docs),
        characters_used=sum(len(documents[i].text) for i in used_docs.tolist()),
        tokens_covered=len(torch.unique(positions)),
        overlapping=overlapping,
    )
    if overlapping:
        log.warning(
            "%s: the %s corpus holds %d tokens, fewer than %d windows x %d; windows overlap "
            "(coverage %.0f%% of the corpus)",
            code,
            config.corpus,
            len(stream),
            count,
            width,
            100 * stats.coverage,
        )
    return windows, stats


# ---------------------------------------------------------------------------------------------
# Cache


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, normalizer) and BOS behaviour."""
    location = Path(str(tokenizer.name_or_path)) / "tokenizer.json"
    if location.is_file():
        definition = file_sha256(location)
    elif hasattr(tokenizer, "backend_tokenizer"):
        definition = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    else:
        definition = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
    return f"{definition}:{adds_bos(tokenizer)}:{tokenizer.bos_token_id}"


_DEFINING_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _card_path(folder: Path) -> Path | None:
    """Where the fingerprint of the tokenizer saved in `folder` is kept, keyed by the content of
    the files that define it; None when `folder` is not a tokenizer folder on this machine."""
    files = [folder / name for name in _DEFINING_FILES if (folder / name).is_file()]
    if not files:
        return None
    key = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}" for f in files).encode()).hexdigest()[:20]
    return cache_dir() / "tokenizers" / "cards" / f"{key}.json"


def known_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of the tokenizer in `folder` without loading it, when one was recorded."""
    card = _card_path(Path(folder))
    if card is None or not card.is_file():
        return None
    try:
        return str(json.loads(card.read_text())["fingerprint"])
    except (OSError, ValueError, KeyError):
        return None


def record_fingerprint(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """`tokenizer_fingerprint`, kept so that later runs need not load the tokenizer to compute it."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    card = _card_path(Path(folder))
    if card is not None:
        built = staging(card)
        built.write_text(json.dumps({"fingerprint": fingerprint}))
        publish(built, card)
    return fingerprint


def text_corpus(config: CalibrationConfig) -> Corpus:
    """The corpus a calibration set is cut from (a user error names `self` among the choices)."""
    try:
        return get_corpus(config.corpus, config.data_dir)
    except CpsError as error:
        if config.corpus.partition(":")[0] in CORPORA:
            raise
        raise CpsError(f"{error}, or {SELF_CORPUS} (text sampled from the model)") from None


def check_sources(config: CalibrationConfig) -> None:
    """Everything `config` reads exists (its corpus and languages; for self-generated text, the
    prompt corpus), without reading any text."""
    if is_self(config.corpus):
        get_corpus(PROMPT_CORPUS, config.data_dir)  # a language it lacks is prompted by BOS alone
        return
    corpus = text_corpus(config)
    for code in config.mixture:
        corpus.require(code)


def calibration_hash(config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase | str) -> str:
    """`tokenizer`: the tokenizer, or its fingerprint already known. The mixture enters written out
    (`mixture_spec`), so a recipe (`sw+en`) and its proportions (`sw:0.5,en:0.5`) share one set."""
    key: dict[str, object] = {
        "format": FORMAT_VERSION,
        "corpus": config.corpus.partition(":")[0],
        "mixture": mixture_spec(config.mixture),
        "tokenizer": tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer),
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "seed": config.seed,
    }
    if is_self(config.corpus):  # the text is the model's: its weights, its prompts, the protocol
        key["content"] = {code: prompt_fingerprint(code, config.data_dir) for code in config.mixture}
        key |= {"model": model_fingerprint(config.model), "generator": SELFGEN_VERSION}
    else:
        corpus = text_corpus(config)
        key["content"] = {code: corpus.fingerprint(code) for code in config.mixture}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cache_path(calib_hash: str) -> Path:
    return cache_dir() / "calibration" / f"{calib_hash}.safetensors"


def save_calibration(calib: CalibrationSet, path: Path) -> None:

    codes = list(calib.stats)
    lang_index = torch.tensor([codes.index(code) for code in calib.window_langs], dtype=torch.long)
    metadata = {
        "config": json.dumps(asdict(calib.config)),
        "langs": json.dumps(codes),
        "stats": json.dumps({code: asdict(s) for code, s in calib.stats.items()}),
        "calib_hash": calib.calib_hash,
        "extra": json.dumps(calib.extra),
    }
    built = staging(path)
    save_file({"input_ids": calib.input_ids.contiguous(), "window_lang": lang_index}, str(built), metadata)
    publish(built, path)


def load_calibration(path: Path) -> CalibrationSet:

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        input_ids, lang_index = handle.get_tensor("input_ids"), handle.get_tensor("window_lang")
    codes = json.loads(metadata["langs"])
    return CalibrationSet(
        config=CalibrationConfig(**json.loads(metadata["config"])),
        input_ids=input_ids,
        window_langs=[codes[i] for i in lang_index.tolist()],
        stats={code: LanguageStats(**s) for code, s in json.loads(metadata["stats"]).items()},
        calib_hash=metadata["calib_hash"],
        cache_path=path,
        extra=json.loads(metadata.get("extra", "{}")),  # sets written before it have none
    )


def _load_cached(path: Path) -> CalibrationSet | None:
    """The cached set at `path`; None when absent, or unreadable (then dropped, one warning)."""
    if not path.is_file():
        return None
    try:
        return load_calibration(path)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        discard(path, first_line(error))
        return None


def as_tokenizer(
    value: PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase],
) -> PreTrainedTokenizerBase:
    """`value` when it is a tokenizer, else what the function `value` loads."""
    return value if hasattr(value, "convert_ids_to_tokens") else value()  # type: ignore[operator,return-value]


def build_calibration(
    config: CalibrationConfig,
    tokenizer: PreTrainedTokenizerBase | Callable[[], PreTrainedTokenizerBase],
    fingerprint: str | None = None,
) -> CalibrationSet:
    """The calibration set for `config`, from the cache when an identical one was built before.
    `tokenizer` may be a function loading it, with its `fingerprint` known: a cache hit then never
    loads the tokenizer (Gemma-3's takes 0.12 GB and seconds), nor the model for self-generated text."""

    if fingerprint is None:
        tokenizer = as_tokenizer(tokenizer)
    calib_hash = calibration_hash(config, fingerprint or tokenizer)  # type: ignore[arg-type]
    path = _cache_path(calib_hash)
    cached = _load_cached(path)
    if cached is not None:
        # Corpus windows depend on the tokenizer, not the model: another model with the same
        # tokenizer hits this entry, and the set must then carry the caller's config.
        cached.config, cached.cache_hit = config, True
        return cached
    tokenizer = as_tokenizer(tokenizer)
    counts = {code: count for code, count in window_counts(config.mixture, config.nsamples).items() if count}
    extra: dict[str, Any] = {}
    if is_self(config.corpus):
        sample = _self_sampler(config, tokenizer, extra)
    else:
        sample = _corpus_sampler(config, tokenizer, max(counts.values()))
    windows, langs, stats = [], [], {}
    for code, count in counts.items():
        sampled, stats[code] = sample(code, count)
        windows.append(sampled)
        langs += [code] * count
    input_ids = torch.cat(windows)
    if len(stats) > 1:  # interleave the languages
        order = torch.randperm(len(langs), generator=_language_generator(config.seed, "mix"))
        input_ids, langs = input_ids[order], [langs[i] for i in order.tolist()]
    calib = CalibrationSet(config, input_ids, langs, stats, calib_hash, path, extra=extra)
    save_calibration(calib, path)
    return calib


def _corpus_sampler(config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase, most: int) -> Sampler:
    """Windows cut from the corpus's documents; `most`: the most windows of one language."""
    corpus = text_corpus(config)
    # A streamed corpus reads about 8 characters per needed token (plenty for every script).
    budget = 8 * config.seqlen * most

    def sample(code: str, count: int) -> tuple[torch.Tensor, LanguageStats]:
        documents = corpus.documents(code, max_chars=budget)
        return _sample_language(documents, tokenizer, count, config, code)

    return sample


def _self_sampler(
    config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase, extra: dict[str, Any]
) -> Sampler:
    """Windows the dense model samples itself (`cps.data.selfgen`); what generated them goes into
    `extra`, which the cached set keeps."""
    options = LoadOptions("float32", "cpu")
    if wants_stream(config.model, options):  # generation holds the whole model: no streamed form
        raise CpsError(
            f"--corpus self samples from {config.model} whole in float32 on the CPU, which would not "
            "fit in this machine's memory: calibrate on a corpus instead"
        )
    log.info("self-generating calibration text: loading %s (dense, float32, CPU)", config.model)
    model = load_model(config.model, options, tokenizer=False).model
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    extra |= {
        "source": "self-generated",
        "model_id": model_fingerprint(config.model),
        "sampling": SAMPLING,
        "prompts": f"first {PROMPT_TOKENS} tokens of a {PROMPT_CORPUS} document",
        "generator_version": SELFGEN_VERSION,
        "generation_s": 0.0,
    }

    def sample(code: str, count: int) -> tuple[torch.Tensor, LanguageStats]:
        documents = prompt_documents(code, config.data_dir)
        if not documents:
            log.warning(
                "%s: %s has no %r text; self-generation starts from BOS alone", code, PROMPT_CORPUS, code
            )
        started = time.perf_counter()
        generator = _language_generator(config.seed, code)
        windows, used = generate_windows(
            model, tokenizer, prefix, documents, (count, config.seqlen), generator
        )
        extra["generation_s"] += time.perf_counter() - started
        prompts = sorted(set(used))
        stats = LanguageStats(
            windows=count,
            corpus_tokens=windows.numel(),  # the generated text is the corpus, all of it used
            corpus_characters=sum(len(d.text) for d in documents),
            corpus_documents=len(documents),
            documents_used=len(prompts),
            characters_used=sum(len(documents[i].text) for i in prompts),
            tokens_covered=windows.numel(),
            overlapping=False,
        )
        return windows, stats

    return sample
