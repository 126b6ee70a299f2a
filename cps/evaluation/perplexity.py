"""Token perplexity and bits per byte on held-out text (FLORES dev+test by default).

Chunking: the documents form one token stream exactly as calibration builds it (each document
tokenized without special tokens, documents joined by the tokens of a blank line). The stream is
cut into consecutive pieces of `seqlen - 1` tokens; each piece is scored with one token of context
in front: BOS (or EOS when there is no BOS) for the first piece, the previous piece's last token
for the others. So every stream token is predicted exactly once, from the start of its piece.
(Without any BOS/EOS token the very first token goes unscored.)

    ppl = exp(sum NLL / predicted tokens)      bpb = sum NLL / ln 2 / UTF-8 bytes of the text

Bits per byte are comparable across tokenizers and languages; perplexity is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cps.data.calibration import DOCUMENT_SEPARATOR, token_stream
from cps.data.corpus import Document
from cps.errors import CpsError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOGITS_BUDGET_BYTES = 1 << 30  # fp32 logits held at once decide the batch size


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the evaluated text

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes


def score_chunks(stream: torch.Tensor, seqlen: int, start_token: int | None) -> list[torch.Tensor]:
    """Inputs of length <= seqlen; in each, every token after the first is a prediction target."""
    if seqlen < 2:
        raise CpsError(f"--seqlen must be at least 2 (got {seqlen})")
    width = seqlen - 1
    chunks = []
    for start in range(0, len(stream), width):
        piece = stream[start : start + width]
        if start > 0:
            context = stream[start - 1 : start]
        elif start_token is not None:
            context = torch.tensor([start_token], dtype=stream.dtype)
        else:
            context = piece[:0]
        chunk = torch.cat([context, piece])
        if len(chunk) >= 2:
            chunks.append(chunk)
    return chunks


def _batches(chunks: list[torch.Tensor], vocab: int) -> list[torch.Tensor]:
    """Equal-length chunks stacked, as many per batch as the logits budget allows."""
    batches: list[torch.Tensor] = []
    by_length: dict[int, list[torch.Tensor]] = {}
    for chunk in chunks:
        by_length.setdefault(len(chunk), []).append(chunk)
    for length, group in by_length.items():
        size = max(1, LOGITS_BUDGET_BYTES // (length * vocab * 4))
        batches += [torch.stack(group[i : i + size]) for i in range(0, len(group), size)]
    return batches


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    seqlen: int = 1024,
) -> PerplexityResult:
    if not documents:
        raise CpsError("no text to evaluate perplexity on")
    stream, _ = token_stream(documents, tokenizer)
    start_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    nll, predicted = 0.0, 0
    for batch in _batches(
        score_chunks(stream, seqlen, start_token), model.config.get_text_config().vocab_size
    ):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, L, vocab)
        targets = batch[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        nll += losses.item()
        predicted += targets.numel()
    text_bytes = len(DOCUMENT_SEPARATOR.join(d.text for d in documents).encode("utf-8"))
    return PerplexityResult(nll, predicted, text_bytes)
