"""Self-generated calibration text (`--corpus self`): windows the dense model samples itself.

Ji et al., "Beware of Calibration Data for Pruning Large Language Models" (ICLR 2025): text a model
generates from short prefixes resembles its (inaccessible) pre-training data more than public corpora
do, and calibrating Wanda, OWL and DSnoT on it prunes better. Per language (`SELFGEN_VERSION`):

1. Prompts. `count` NTREX documents of the language, drawn by the seed (a permutation, repeated when
   there are more windows than documents); a prompt is the first `PROMPT_TOKENS` tokens of its
   document (the start of its headline; no special tokens), fewer when the window has no room. A
   language NTREX lacks starts from the tokenizer's BOS alone.
2. Windows. Each is the tokenizer's own prefix (BOS where it adds one, as in corpus windows), the
   prompt, then sampled tokens: `seqlen` in all.
3. Sampling. The dense model, float32 on the CPU, continues `BATCH_WINDOWS` windows at a time through
   its KV cache, one token a step drawn from softmax(logits): temperature 1, no top-k or top-p (the
   model's own distribution), from one torch.Generator seeded by (seed, language). Special tokens
   (BOS, EOS, padding, unused) are never drawn, so every window is one running text. Unlike Ji et
   al., no perplexity filter follows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cps.data import get_corpus
from cps.data.corpus import Document
from cps.errors import CpsError
from cps.models import model_id, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SELF_CORPUS = "self"  # the `--corpus` value
SELFGEN_VERSION = 1  # bump when the protocol above changes: old cache entries stop matching
PROMPT_CORPUS = "ntrex"
PROMPT_TOKENS = 8
BATCH_WINDOWS = 32  # windows sampled together: bounds the KV cache (Gemma-3 270M: ~1 GB at 2048)
SAMPLING = "temperature 1, no top-k/top-p, special tokens never drawn"


def is_self(corpus: str) -> bool:
    return corpus == SELF_CORPUS


def prompt_documents(code: str, data_dir: str | Path | None) -> list[Document]:
    """The NTREX documents the prompts of `code` come from; [] where NTREX has no such language."""
    corpus = get_corpus(PROMPT_CORPUS, data_dir)
    return corpus.documents(code) if code in corpus.languages() else []


def prompt_fingerprint(code: str, data_dir: str | Path | None) -> str:
    """What the prompts of `code` are drawn from: NTREX's content hash, or `bos` (no text)."""
    corpus = get_corpus(PROMPT_CORPUS, data_dir)
    return corpus.fingerprint(code) if code in corpus.languages() else "bos"


def model_fingerprint(name: str) -> str:
    """The generating model's weights: `model_id`, and for a local folder (rewritable in place) the
    size and time of each weight file."""
    spec = resolve_model(name)
    identity = model_id(spec)
    if spec.source == "path":
        files = sorted(p for p in Path(str(spec.hf_id)).iterdir() if p.suffix in (".safetensors", ".bin"))
        identity += "|" + ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return identity


def choose_prompts(
    documents: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    length: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[int]]:
    """`count` prompts of `length` tokens [count, length] and the document each came from (documents
    shorter than `length` tokens are passed over); [count, 0] and no documents without any text."""
    texts = [d.text for d in documents] if length else []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eligible = [index for index, ids in enumerate(encoded) if len(ids) >= length]
    if not eligible:
        return torch.empty(count, 0, dtype=torch.long), []
    order = torch.randperm(len(eligible), generator=generator).tolist()
    picks = [eligible[order[k % len(order)]] for k in range(count)]
    return torch.tensor([encoded[index][:length] for index in picks], dtype=torch.long), picks


def never_drawn(tokenizer: PreTrainedTokenizerBase, vocab: int) -> torch.Tensor:
    """[vocab] bool: the special tokens, and logits past the tokenizer's vocabulary (padded heads)."""
    banned = torch.zeros(vocab, dtype=torch.bool)
    special = {*tokenizer.all_special_ids}
    special |= {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    banned[[index for index in special if index < vocab]] = True
    banned[len(tokenizer) :] = True
    return banned


@torch.inference_mode()
def sample_continuations(
    model: PreTrainedModel, start: torch.Tensor, total: int, generator: torch.Generator, banned: torch.Tensor
) -> torch.Tensor:
    """start [B, s] -> [B, total]: `start` continued by tokens drawn one a step (temperature 1)."""
    tokens, step, cache = start, start, None
    while tokens.shape[1] < total:
        output = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
        cache = output.cache
        logits = output.logits[:, -1, :].float().masked_fill(banned, float("-inf"))  # [B, vocab]
        step = draw(torch.softmax(logits, dim=-1), generator)  # [B, 1]
        tokens = torch.cat([tokens, step], dim=1)
    return tokens


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [B, vocab] -> one token each [B, 1], by inverting the cumulative distribution at a
    uniform draw (~7x faster than `torch.multinomial` over Gemma's 262k tokens); a token of
    probability 0 is never drawn (`right=True`: the first index whose cumulative sum exceeds u)."""
    cumulative = probs.double().cumsum(dim=-1)  # [B, vocab]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.shape[1] - 1)


def generate_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix: list[int],
    documents: list[Document],
    shape: tuple[int, int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[int]]:
    """`shape` = (count, seqlen) windows [count, seqlen]: `prefix` (the tokenizer's BOS, or none), a
    prompt from `documents`, sampled tokens. Returns them and the prompt documents (steps 1-3)."""
    count, seqlen = shape
    length = max(0, min(PROMPT_TOKENS, seqlen - len(prefix) - 1))  # room for one sampled token
    prompts, used = choose_prompts(documents, tokenizer, count, length, generator)
    if not prefix and not used:  # no BOS added and no text: start from the BOS token all the same
        start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start_token is None:
            raise CpsError("no text to prompt from and no BOS or EOS token to start self-generation")
        prefix = [int(start_token)]
    start = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(count, -1), prompts], dim=1)
    banned = never_drawn(tokenizer, model.get_output_embeddings().weight.shape[0])
    windows = [
        sample_continuations(model, start[first : first + BATCH_WINDOWS], seqlen, generator, banned)
        for first in range(0, count, BATCH_WINDOWS)
    ]
    return torch.cat(windows), used
