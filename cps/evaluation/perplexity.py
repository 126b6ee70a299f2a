"""Token perplexity and bits per byte of held-out documents (FLORES dev+test by default).

The text is scored under the protocol of `cps.evaluation.windows`: each document on its own, every
window starting with the tokenizer's BOS, every document token scored exactly once.

    ppl = exp(sum NLL / scored tokens)      bpb = sum NLL / ln 2 / UTF-8 bytes of the scored text

Bits per byte are comparable across tokenizers and languages; perplexity is not. The result keeps
each document's NLL, tokens and bytes, from which both are recomputed exactly.

The LM head and its log-softmax run on the scored positions only, in chunks of at most
`HEAD_BUDGET_BYTES` of fp32 logits: never a [batch, seqlen, vocab] tensor (Gemma-3's vocabulary
has 262k entries). A `LayerObserver` sees every decoder layer's hidden states at the scored
positions of the same forward pass (the held-out SNR against the dense model needs no extra pass).
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl
import torch

from cps.data.corpus import Document
from cps.evaluation.windows import Batch, HeldOutText, Window, batches, held_out_windows
from cps.hooks import output_hooks
from cps.models import decoder_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_BUDGET_BYTES = 256 << 20  # fp32 logits held at once
BATCH_TOKENS = 8192  # window tokens (b x L) per forward


@dataclass
class PerplexityResult:
    documents: list[str]  # document ids
    nll: list[float]  # summed negative log-likelihood per document, nats
    tokens: list[int]  # scored tokens per document
    bytes: list[int]  # UTF-8 bytes of each document's scored text

    @property
    def total_nll(self) -> float:
        return math.fsum(self.nll)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def ppl(self) -> float:
        return math.exp(self.total_nll / self.total_tokens)

    @property
    def bpb(self) -> float:
        return self.total_nll / math.log(2) / sum(self.bytes)

    def frame(self) -> pl.DataFrame:
        """Per-document results (`items/ppl_<lang>.parquet`): document, nll, tokens, bytes."""

        return pl.DataFrame(
            {"document": self.documents, "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes},
            schema={"document": pl.String, "nll": pl.Float64, "tokens": pl.Int64, "bytes": pl.Int64},
        )


class LayerObserver:
    """Sees each decoder layer's hidden states at the scored positions of every batch."""

    def begin(self, batch: Batch) -> None:
        """A new batch starts (its `scored` mask orders the states `layer` receives)."""

    def layer(self, index: int, states: torch.Tensor) -> None:
        """(n, d) states of layer `index` at the batch's scored positions, row by row."""


class OutputHead:
    """The model's LM head applied to chosen positions, as its own forward applies it: the output
    projection, then Gemma's final logit soft-capping or Cohere's logit scale where configured."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.linear = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(model, "logit_scale", None)
        self.scale = float(scale) if isinstance(scale, int | float) else None
        self.vocab = int(self.linear.weight.shape[0])

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = self.linear(states)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale is not None:
            logits = logits * self.scale
        return logits

    def nll(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n,) fp32 NLL of each target given the state before it, in chunks of positions."""
        chunk = max(1, HEAD_BUDGET_BYTES // (4 * self.vocab))
        parts = [
            torch.nn.functional.cross_entropy(
                self.logits(states[start : start + chunk]).float(),
                targets[start : start + chunk],
                reduction="none",
            )
            for start in range(0, len(states), chunk)
        ]
        return torch.cat(parts)


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _output_head(model: PreTrainedModel, sample: torch.Tensor) -> OutputHead | None:
    """The chunked head when it reproduces the model's own logits (checked once per model on a few
    tokens), else None: the model's full forward is used instead."""
    if model not in _HEAD_CHECKED:
        head = None
        if model.base_model is not model and model.get_output_embeddings() is not None:
            candidate = OutputHead(model)
            ids = sample[:1, : min(8, sample.shape[1])]
            try:
                reference = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            except TypeError:
                reference = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, -1:]
            mine = candidate.logits(hidden)[0].float()
            tolerance = 1e-4 * float(reference.abs().max()) + 1e-5
            head = candidate if torch.allclose(mine, reference, rtol=1e-3, atol=tolerance) else None
        _HEAD_CHECKED[model] = head
    return _HEAD_CHECKED[model]


@torch.inference_mode()
def score_windows(
    model: PreTrainedModel,
    windows: list[Window],
    observer: LayerObserver | None = None,
    head: bool = True,
) -> torch.Tensor:
    """Summed NLL of each window's scored tokens (float64, in window order); with `head=False` only
    the decoder runs (for observers) and the NLLs are zero."""
    device = next(model.parameters()).device
    nll = torch.zeros(len(windows), dtype=torch.float64)
    work = batches(windows, BATCH_TOKENS)
    output_head = _output_head(model, work[0].input_ids.to(device)) if head else None
    current: list[Batch] = []

    def on_layer(index: int, output: torch.Tensor) -> None:
        assert observer is not None
        observer.layer(index, output[current[0].scored.to(output.device)])

    hooks = output_hooks(decoder_layers(model), on_layer) if observer else nullcontext()
    with hooks:
        for batch in work:
            current[:] = [batch]
            if observer:
                observer.begin(batch)
            ids = batch.input_ids.to(device)
            if not head:
                model.base_model(input_ids=ids, use_cache=False)
                continue
            targets = batch.input_ids[batch.scored].to(device)
            predicting = batch.predicting.to(device)
            if output_head is not None:
                hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                token_nll = output_head.nll(hidden[predicting], targets)
            else:  # a head cps cannot reproduce: the model's own full logits, exact for any model
                logits = model(input_ids=ids, use_cache=False).logits[predicting].float()
                token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            rows = batch.scored.nonzero()[:, 0]
            per_row = torch.zeros(len(batch.rows), dtype=torch.float64)
            per_row.index_add_(0, rows, token_nll.double().cpu())
            nll[batch.rows] = per_row
    return nll


def score_text(
    model: PreTrainedModel, text: HeldOutText, observer: LayerObserver | None = None
) -> PerplexityResult:
    """Per-document NLL, tokens and bytes of held-out text already cut into windows."""
    per_window = score_windows(model, text.windows, observer)
    per_document = [0.0] * len(text.documents)
    for window, value in zip(text.windows, per_window.tolist(), strict=True):
        per_document[window.document] += value
    return PerplexityResult([d.id for d in text.documents], per_document, text.tokens, text.bytes)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    seqlen: int = 1024,
    stride: int | None = None,
) -> PerplexityResult:
    return score_text(model, held_out_windows(documents, tokenizer, seqlen, stride))
